"""`splitserve bench`: a load generator for the router's gRPC (SDK) or OpenAI-compatible HTTP API.

Life cycle of one run:
  1. workload: N requests (random token-id prompts sent with ignore_eos, or a JSONL file) and N
     arrival offsets (gamma inter-arrivals of shape B, mean 1/rate; B=1 is Poisson);
  2. dispatch: the main thread waits for each arrival, then for a slot under --max-concurrency,
     and hands the request to a worker thread, which stamps each token-carrying chunk with
     time.perf_counter and returns a RequestRecord (TTFT, ITL, E2E, tokens) or a failure's status;
  3. summarize(records): percentiles, throughputs, failures by status, goodput under SLOs; a table
     on stdout and, with --output, JSON with config, summary and every record.
Ctrl-C stops dispatch, cancels what is in flight (closes the gRPC channel / shuts the sockets)
and still reports what finished.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import httpx
import numpy as np
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from splitserve.proto.client import Client, SplitserveError
from splitserve.proto.status import STATUSES

PERCENTILES = (50, 90, 99)
DEFAULT_ADDRESS = {"grpc": "127.0.0.1:50051", "http": "http://127.0.0.1:8000"}


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]
    max_tokens: int
    ignore_eos: bool


@dataclass
class RequestRecord:
    """One request's outcome. Times in seconds; `start` is relative to the start of the run."""

    index: int
    start: float = 0.0
    status: str = "OK"  # or the failure's status name, e.g. "UNAVAILABLE"
    error: str = ""
    prompt_tokens: int | None = None  # None: unknown (a text prompt over gRPC)
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# ---- statistics ----------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile, linear interpolation between ranks."""
    if len(values) == 0:
        raise ValueError("percentile of no values")
    return float(np.percentile(values, p))


def fill_timings(rec: RequestRecord, sent: float, chunks: Sequence[tuple[float, int]], done: float, usage_tokens: int | None) -> None:
    """Timings of a finished stream from its send time, (time, tokens) of each token-carrying chunk
    and its end. A chunk of n tokens after a gap g adds n inter-token latencies of g/n."""
    rec.e2e = done - sent
    rec.output_tokens = usage_tokens if usage_tokens is not None else sum(n for _, n in chunks)
    rec.ttft = chunks[0][0] - sent if chunks else None
    rec.itl = [(t - prev) / n for (prev, _), (t, n) in zip(chunks, chunks[1:]) for _ in range(n)]


def _dist_ms(values: Sequence[float]) -> dict[str, float | None]:
    ms = [v * 1000 for v in values]
    return {"mean": sum(ms) / len(ms) if ms else None, **{f"p{p}": percentile(ms, p) if ms else None for p in PERCENTILES}}


def meets_slo(rec: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """Succeeded within every given SLO (a one-token request has no TPOT and passes that one)."""
    if not rec.ok:
        return False
    if slo_ttft_ms is not None and (rec.ttft is None or rec.ttft * 1000 > slo_ttft_ms):
        return False
    return slo_tpot_ms is None or rec.tpot is None or rec.tpot * 1000 <= slo_tpot_ms


def summarize(records: Sequence[RequestRecord], duration: float, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict:
    ok = [r for r in records if r.ok]
    failed = Counter(r.status for r in records if not r.ok)
    inp, out = sum(r.prompt_tokens or 0 for r in ok), sum(r.output_tokens for r in ok)

    def per_s(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    s = {
        "requests": len(records), "completed": len(ok), "failed": sum(failed.values()), "failed_by_status": dict(sorted(failed.items())),
        "first_error_by_status": {st: next(r.error for r in records if not r.ok and r.status == st) for st in sorted(failed)},
        "duration_s": duration, "input_tokens": inp, "output_tokens": out, "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(out), "total_token_throughput": per_s(inp + out),
        "ttft_ms": _dist_ms([r.ttft for r in ok if r.ttft is not None]), "tpot_ms": _dist_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _dist_ms([x for r in ok for x in r.itl]), "e2e_ms": _dist_ms([r.e2e for r in ok if r.e2e is not None]),
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in records)
        s["goodput"] = {"slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms, "good": good, "request_goodput": per_s(good),
                        "good_fraction": good / len(records) if records else 0.0}  # of every request sent, failures included
    return s


# ---- workload ------------------------------------------------------------------------------
def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets in seconds, the first at 0: gamma inter-arrivals of shape `burstiness` and mean
    1/rate (exponential, i.e. Poisson arrivals, when burstiness is 1); all at 0 when rate is inf."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"--request-rate and --burstiness must be > 0, got {rate} and {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def length_range(length: int, ratio: float) -> tuple[int, int]:
    """The integers inside [length*(1-ratio), length*(1+ratio)], at least 1."""
    return max(1, math.ceil(length * (1 - ratio))), max(1, math.floor(length * (1 + ratio)))


def synthetic_requests(n: int, input_len: int, output_len: int, range_ratio: float = 0.0, vocab_size: int = 256,
                       seed: int = 0) -> list[BenchRequest]:
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    (ilo, ihi), (olo, ohi) = length_range(input_len, range_ratio), length_range(output_len, range_ratio)
    return [BenchRequest([rng.randrange(vocab_size) for _ in range(rng.randint(ilo, ihi))], rng.randint(olo, ohi), True) for _ in range(n)]


def load_dataset(path: str, n: int, default_max_tokens: int, ignore_eos: bool) -> list[BenchRequest]:
    """The first n prompts of a JSONL file of {"prompt": str | [ids], "max_tokens": int?}, cycling if it is shorter."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(type(t) is int for t in prompt))):
                raise ValueError(f"{path}:{lineno}: 'prompt' must be a string or a list of token ids")
            max_tokens = row.get("max_tokens", default_max_tokens)
            if type(max_tokens) is not int or max_tokens < 1:
                raise ValueError(f"{path}:{lineno}: 'max_tokens' must be a positive integer, got {max_tokens!r}")
            rows.append(BenchRequest(prompt, max_tokens, ignore_eos))
            if len(rows) == n:
                break
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return [rows[i % len(rows)] for i in range(n)]


# ---- backends ------------------------------------------------------------------------------
def _error(status: str, message: str) -> SplitserveError:
    err = SplitserveError(message)
    err.status = status
    return err


class Backend(Protocol):
    def stream(self, req: BenchRequest, usage: dict) -> Iterator[int]:
        """Yields the number of tokens in each chunk; fills usage (prompt/completion_tokens) where known."""

    def close(self) -> None:
        """Cancels every request in flight; later streams fail."""


class GrpcBackend:
    def __init__(self, address: str, api_key: str | None, temperature: float, timeout: float) -> None:
        self.client = Client(address, api_key=api_key, timeout=timeout)
        self.temperature, self.timeout = temperature, timeout

    def stream(self, req: BenchRequest, usage: dict) -> Iterator[int]:
        if isinstance(req.prompt, list):
            usage["prompt_tokens"] = len(req.prompt)
        for chunk in self.client.generate_stream(req.prompt, max_tokens=req.max_tokens, temperature=self.temperature,
                                                 ignore_eos=req.ignore_eos, timeout=self.timeout):
            yield len(chunk.token_ids)

    def close(self) -> None:
        self.client.close()  # closing the channel cancels every RPC on it


class HttpBackend:
    """The OpenAI streaming API over httpx, one connection per request."""

    def __init__(self, url: str, api_key: str | None, temperature: float, timeout: float) -> None:
        u = urlsplit(url if "://" in url else "http://" + url)
        self.url = f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}/v1/completions"
        self.headers = {"Accept": "text/event-stream", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self.temperature, self.timeout = temperature, timeout
        self.client = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))
        self.live: set[socket.socket] = set()
        self.lock, self.closed = threading.Lock(), False

    def stream(self, req: BenchRequest, usage: dict) -> Iterator[int]:
        body = {"prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": self.temperature, "stream": True,
                "ignore_eos": req.ignore_eos, "stream_options": {"include_usage": True}}
        deadline = time.monotonic() + self.timeout
        if self.closed:
            raise _error("CANCELLED", "the bench was stopped")
        with self.client.stream("POST", self.url, json=body, headers=self.headers) as resp:
            sock = resp.extensions["network_stream"].get_extra_info("socket")
            with self.lock:
                self.live.add(sock)
            try:
                if resp.status_code != 200:
                    raise _http_error(resp.status_code, resp.read())
                for event in sse_events(resp.iter_lines()):
                    if "error" in event:  # a failure after the headers comes in-band
                        raise _error(str(event["error"].get("type", "INTERNAL")).upper(), event["error"].get("message", ""))
                    usage.update(event.get("usage") or {})
                    choices = event.get("choices") or []
                    if choices and choices[0].get("text"):
                        yield 1
                    if time.monotonic() > deadline:  # bounds the whole request, not each read
                        raise _error("DEADLINE_EXCEEDED", f"no complete answer within {self.timeout} s")
            except httpx.TimeoutException:
                raise _error("DEADLINE_EXCEEDED", f"no complete answer within {self.timeout} s") from None
            finally:
                with self.lock:
                    self.live.discard(sock)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for sock in self.live:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
                except OSError:
                    pass
        self.client.close()


def sse_events(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON of each `data:` line up to `data: [DONE]`; the stream ending before it is an error."""
    for line in lines:
        if line.startswith("data:"):
            if line[5:].strip() == "[DONE]":
                return
            yield json.loads(line[5:])
    raise ConnectionResetError("the stream ended before data: [DONE]")


def _http_error(code: int, body: bytes) -> SplitserveError:
    try:
        err = json.loads(body)["error"]
        kind, message = str(err.get("type", "")).upper(), str(err.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        kind, message = "", body.decode(errors="replace")[:200]
    if kind not in STATUSES:
        kind = next((name for name, (_, http) in STATUSES.items() if http == code), f"HTTP_{code}")
    return _error(kind, message or f"HTTP {code}")


# ---- running -------------------------------------------------------------------------------
def _status_of(e: Exception) -> str:
    if isinstance(e, SplitserveError):
        return e.status
    if isinstance(e, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return "UNAVAILABLE" if isinstance(e, (OSError, httpx.TransportError)) else "INTERNAL"


def run_one(backend: Backend, req: BenchRequest, index: int, t0: float, stop: threading.Event) -> RequestRecord:
    rec, usage, chunks = RequestRecord(index), {}, []
    sent = time.perf_counter()
    rec.start = sent - t0
    stream = backend.stream(req, usage)
    try:
        for n in stream:
            if n:
                chunks.append((time.perf_counter(), n))
            if stop.is_set():
                raise _error("CANCELLED", "the bench was stopped")
    except Exception as e:
        rec.status, rec.error = ("CANCELLED" if stop.is_set() else _status_of(e)), str(e) or type(e).__name__
        return rec
    finally:
        stream.close()  # leaving early cancels the request
    fill_timings(rec, sent, chunks, time.perf_counter(), usage.get("completion_tokens"))
    rec.prompt_tokens = usage.get("prompt_tokens")
    return rec


def run_requests(backend: Backend, requests: Sequence[BenchRequest], arrivals: Sequence[float], max_concurrency: int | None,
                 on_done: Callable[[RequestRecord], None]) -> tuple[list[RequestRecord], float, bool]:
    """Send each request at its arrival offset once a slot is free. On Ctrl-C: stop sending, cancel
    what is in flight, and return what was sent. Returns (records, duration, interrupted)."""
    stop, records, futures = threading.Event(), [], []
    slots = threading.BoundedSemaphore(max_concurrency or len(requests))
    t0 = time.perf_counter()

    def work(i: int) -> RequestRecord:
        try:
            return run_one(backend, requests[i], i, t0, stop)
        finally:
            slots.release()

    def done(f: Future) -> None:
        if not f.cancelled():
            records.append(f.result())
            on_done(f.result())

    pool = ThreadPoolExecutor(max_workers=max(1, max_concurrency or len(requests)), thread_name_prefix="bench")
    interrupted = False
    try:
        for i, at in enumerate(arrivals):
            time.sleep(max(0.0, t0 + at - time.perf_counter()))
            while not slots.acquire(timeout=0.2):  # a timeout keeps Ctrl-C prompt
                pass
            futures.append(pool.submit(work, i))
            futures[-1].add_done_callback(done)
        wait(futures)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        backend.close()
        wait(futures)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return sorted(records, key=lambda r: r.index), time.perf_counter() - t0, interrupted


class ProgressLine:
    """`done/total` on stderr, with the failures so far, while the bench runs."""

    def __init__(self, total: int) -> None:
        self.progress = Progress(TextColumn("bench: {task.completed:.0f}/{task.total:.0f} done, {task.fields[failed]} failed"), BarColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        self.task = self.progress.add_task("bench", total=total, failed=0)
        self.failed = 0

    def __call__(self, rec: RequestRecord) -> None:
        self.failed += not rec.ok
        self.progress.update(self.task, advance=1, failed=self.failed)

    def __enter__(self) -> "ProgressLine":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def summary_table(s: dict, title: str) -> Table:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"])]
    first = s.get("first_error_by_status", {})
    rows += [(f"  {status}", f"{n}  (first: {first[status][:120]})" if first.get(status) else n) for status, n in s["failed_by_status"].items()]
    rows += [("Duration (s)", num(s["duration_s"])), ("Input tokens", s["input_tokens"]), ("Output tokens", s["output_tokens"]),
             ("Request throughput (req/s)", num(s["request_throughput"])), ("Output token throughput (tok/s)", num(s["output_throughput"])),
             ("Total token throughput (tok/s)", num(s["total_token_throughput"]))]
    if "goodput" in s:
        rows += [("Goodput (req/s)", num(s["goodput"]["request_goodput"])), ("Good fraction", num(s["goodput"]["good_fraction"]))]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        rows += [(f"{stat.capitalize()} {name} (ms)", num(v)) for stat, v in s[key].items()]
    table = Table(title=f"{title}{' (interrupted)' if s.get('interrupted') else ''}", show_header=False, box=box.SIMPLE_HEAD)
    table.add_column(no_wrap=True)
    table.add_column(justify="right")
    for k, v in rows:
        table.add_row(f"{k}:", str(v))
    return table


# ---- command line ---------------------------------------------------------------------------
def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["grpc", "http"], default="grpc")
    p.add_argument("--url", "--address", dest="url", help="default 127.0.0.1:50051 (grpc), http://127.0.0.1:8000 (http)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals (1 = Poisson; <1 burstier)")
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--dataset", metavar="FILE", help='JSONL of {"prompt": str | [ids], "max_tokens": int?} (default: synthetic)')
    p.add_argument("--input-len", type=int, default=256, help="synthetic prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="synthetic output tokens; max_tokens for dataset lines without one")
    p.add_argument("--range-ratio", type=float, default=0.0, help="synthetic lengths uniform in [len*(1-r), len*(1+r)]")
    p.add_argument("--vocab-size", type=int, default=256, help="synthetic token ids are drawn from [0, V) (the default fits any model)")
    p.add_argument("--ignore-eos", action="store_true", help="also for --dataset prompts (synthetic ones always ignore EOS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--slo-ttft", type=float, metavar="MS", help="goodput counts requests with TTFT <= MS")
    p.add_argument("--slo-tpot", type=float, metavar="MS", help="goodput counts requests with TPOT <= MS")
    p.add_argument("--output", metavar="FILE", help="write config, summary and per-request records as JSON")


def _check(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "input_len", "output_len", "vocab_size", "max_concurrency", "timeout"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")


def run_bench(args: argparse.Namespace) -> int:
    """Returns 0, 1 when no request succeeded, 130 when interrupted."""
    _check(args)
    if args.dataset:
        requests = load_dataset(args.dataset, args.num_prompts, args.output_len, args.ignore_eos)
    else:
        requests = synthetic_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.vocab_size, args.seed)
    arrivals = arrival_times(args.num_prompts, args.request_rate, args.burstiness, args.seed)
    url = args.url or DEFAULT_ADDRESS[args.backend]
    backend = (HttpBackend if args.backend == "http" else GrpcBackend)(url, args.api_key, args.temperature, args.timeout)
    try:
        with ProgressLine(len(requests)) as progress:
            records, duration, interrupted = run_requests(backend, requests, arrivals, args.max_concurrency, progress)
    finally:
        backend.close()
    summary = {**summarize(records, duration, args.slo_ttft, args.slo_tpot), "interrupted": interrupted}
    Console(width=max(80, shutil.get_terminal_size().columns)).print(summary_table(summary, f"splitserve bench: {args.backend} {url}"))
    if args.output:
        config = {k: ("inf" if v == math.inf else v) for k, v in vars(args).items() if k != "func"}
        result = {"config": {**config, "url": url}, "summary": summary, "requests": [{**asdict(r), "tpot": r.tpot} for r in records]}
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 130 if interrupted else (0 if summary["completed"] else 1)
