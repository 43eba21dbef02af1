"""How many concurrent streams one router holds, and what it adds to inter-token latency.

Setup, all on 127.0.0.1 with ports from the OS and stopped at exit: an embedded redis-server, a
paced worker (one asyncio process serving both the prefill and the decode worker API: every
request's first token at once, then one token every `--interval` seconds; no model, so the
machine's two cores go to the router and the clients), and a router (`python -m
splitserve.router`) that finds it through Redis.

At each level N, clients open streaming completions (SSE over HTTP, a lean asyncio client) at
`--ramp` streams a second until N are open, and read each to its end; then the same is done
directly against the worker over gRPC (Reserve -> Prefill -> Decode, as the router does).
Inter-token gaps are counted on the plateau, while all N streams are open. Printed per level:
streams completed / failed, the router's peak RSS and threads, its CPU (cores), the gaps seen
through the router and directly, and "added" = router minus direct.

`--compare-with REV` also runs every level against the router of an earlier commit (checked
out into a temporary git worktree), in the same run: e.g. the thread-per-connection router that
the asyncio one replaced.

    python -m benchmarks.router_concurrency                          # levels 100, 500, 1000, 2000
    python -m benchmarks.router_concurrency --compare-with dcd26af --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.procs import HOST, ROOT, Child, cpu_seconds

logger = logging.getLogger("benchmarks.router_concurrency")


# ---- the paced worker (a subprocess) -------------------------------------------------------
def paced_worker(redis_url: str, cluster: str, interval: float) -> None:
    """Serve PrefillWorker + DecodeWorker on one asyncio gRPC server; register both roles."""
    import grpc

    from splitserve.cluster.registry import Heartbeat, Registry, WorkerRecord
    from splitserve.proto import worker_pb2, worker_pb2_grpc

    started: dict[str, asyncio.Event] = {}
    first_token: dict[str, int] = {}

    def event(rid: str) -> asyncio.Event:
        return started.setdefault(rid, asyncio.Event())

    class Decode(worker_pb2_grpc.DecodeWorkerServicer):
        async def Reserve(self, request, context):
            n = -(-len(request.prompt_token_ids) // 16)
            first_token[request.request_id] = request.params.max_tokens
            return worker_pb2.TransferDescriptor(request_id=request.request_id, block_ids=list(range(n)), transport="grpc",
                                                 endpoint="paced", decode_worker_id="paced-decode")

        async def Decode(self, request, context):
            rid = request.request_id
            await event(rid).wait()
            n = first_token.pop(rid, 16)
            started.pop(rid, None)
            yield worker_pb2.TokenChunk(request_id=rid, token_ids=[65], logprobs=[0.0], num_prompt_tokens=1)
            for i in range(1, n):
                await asyncio.sleep(interval)
                yield worker_pb2.TokenChunk(request_id=rid, token_ids=[65 + i % 26], logprobs=[0.0], finished=i == n - 1,
                                            finish_reason="length" if i == n - 1 else "")

        async def Abort(self, request, context):
            return worker_pb2.AbortResponse(found=False)

        async def Stats(self, request, context):
            return worker_pb2.WorkerStats(worker_id="paced-decode", role="decode")

    class Prefill(worker_pb2_grpc.PrefillWorkerServicer):
        async def Prefill(self, request, context):
            event(request.request_id).set()
            return worker_pb2.PrefillResponse(request_id=request.request_id, first_token=65, first_logprob=0.0)

        async def Abort(self, request, context):
            return worker_pb2.AbortResponse(found=False)

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 10000)])
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(Decode(), server)
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(Prefill(), server)
        port = server.add_insecure_port(f"{HOST}:0")
        await server.start()
        address = f"{HOST}:{port}"
        load = {"running": 0, "waiting": 0, "queued_prefill_tokens": 0, "free_blocks": 1 << 20, "used_blocks": 0, "reserved_blocks": 0, "total_blocks": 1 << 20}
        registry = Registry(redis_url, cluster, 5.0)
        beats = [Heartbeat(registry, WorkerRecord(f"paced-{role}", role, address), lambda: load, lambda: None) for role in ("prefill", "decode")]
        for b in beats:
            b.start()
        print(json.dumps({"event": "ready", "address": address}), flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


# ---- processes -----------------------------------------------------------------------------
def proc_status(pid: int) -> tuple[int, int]:
    """(RSS bytes, threads) of a process."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


# ---- clients -------------------------------------------------------------------------------
async def sse_stream(host: str, port: int, body: bytes) -> list[float]:
    """One streaming completion over a raw HTTP/1.1 connection; the arrival time of each event."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = (await reader.readline()).split()
        if len(status) < 2 or status[1] != b"200":
            raise RuntimeError(f"HTTP {status[1:2]}: {(await reader.read(500))!r}")
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            chunked |= line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
        arrivals: list[float] = []
        async for event in _sse_events(reader, chunked):
            if event == b"[DONE]":
                return arrivals
            if b'"error"' in event[:20]:
                raise RuntimeError(event[:300].decode())
            arrivals.append(time.monotonic())
        raise RuntimeError(f"stream ended without [DONE] after {len(arrivals)} events")
    finally:
        writer.close()


async def _sse_events(reader: asyncio.StreamReader, chunked: bool):
    buf = b""
    while True:
        if chunked:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)
            buf += data[:-2]
        else:
            data = await reader.read(1 << 16)
            if not data:
                return
            buf += data
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if event.startswith(b"data: "):
                yield event[6:]


async def direct_stream(stubs, rid: str, tokens: int) -> list[float]:
    from splitserve.proto import worker_pb2

    prefill, decode = stubs
    params = worker_pb2.SamplingParams(max_tokens=tokens, temperature=0)
    desc = await decode.Reserve(worker_pb2.ReserveRequest(request_id=rid, prompt_token_ids=[1, 2, 3], params=params), timeout=120)
    call = decode.Decode(worker_pb2.DecodeRequest(request_id=rid), timeout=300)
    await prefill.Prefill(worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=[1, 2, 3], params=params, descriptor=desc), timeout=120)
    arrivals = [time.monotonic()]  # the first token, as the router sends it on the prefill's answer
    async for chunk in call:
        if len(arrivals) > 1 or len(chunk.token_ids) and chunk.token_ids != [65]:
            arrivals.append(time.monotonic())
        elif not arrivals[1:] and chunk.finished:
            break
        if chunk.finished:
            return arrivals
    raise RuntimeError("decode stream ended without finishing")


async def run_level(n: int, ramp: float, make) -> dict[str, Any]:
    """Open n streams at `ramp` a second; gaps between tokens that arrive while all n are open."""
    start = time.monotonic()
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(make(i)))
        await asyncio.sleep(max(0.0, start + (i + 1) / ramp - time.monotonic()))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException) and r]
    errors = [r for r in results if isinstance(r, BaseException)]
    plateau = (max(a[0] for a in ok), min(a[-1] for a in ok)) if ok else (0.0, 0.0)
    gaps = [(b - a) * 1000 for arr in ok for a, b in zip(arr, arr[1:]) if a >= plateau[0] and b <= plateau[1]]
    return {"ok": len(ok), "failed": len(errors), "error_example": repr(errors[0])[-300:] if errors else "", "gaps_ms": gaps,
            "wall_s": time.monotonic() - start, "plateau_s": max(0.0, plateau[1] - plateau[0])}


def pct(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(xs, q)) if xs else float("nan")


class Sampler:
    """Peak RSS and threads of a process while a level runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.rss, self.threads = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            rss, threads = proc_status(self.pid)
            self.rss, self.threads = max(self.rss, rss), max(self.threads, threads)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def measure(routers: dict[str, tuple[dict, int]], worker: str, levels: list[int], ramp: float, interval: float) -> list[dict[str, Any]]:
    import grpc

    from splitserve.proto import worker_pb2_grpc

    rows = []
    channel = grpc.aio.insecure_channel(worker)
    stubs = (worker_pb2_grpc.PrefillWorkerStub(channel), worker_pb2_grpc.DecodeWorkerStub(channel))
    for n in levels:
        tokens = int((n / ramp + 4.0) / interval) + 2  # every stream outlives the ramp by ~4 s
        body = json.dumps({"prompt": "a stream", "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}).encode()
        direct = await run_level(n, ramp, lambda i: direct_stream(stubs, f"d{n}-{i}-{time.monotonic_ns()}", tokens))
        for name, (ready, pid) in routers.items():
            host, port = ready["http"].removeprefix("http://").rsplit(":", 1)
            cpu0 = cpu_seconds(pid)
            with Sampler(pid) as s:
                via = await run_level(n, ramp, lambda i: sse_stream(host, int(port), body))
            row = {"router": name, "streams": n, "tokens": tokens, "ok": via["ok"], "failed": via["failed"], "error_example": via["error_example"],
                   "router_rss_mib": s.rss / 2**20, "router_threads": s.threads, "router_cpu_cores": (cpu_seconds(pid) - cpu0) / via["wall_s"],
                   "plateau_s": via["plateau_s"], "itl_router_p50_ms": pct(via["gaps_ms"], 50), "itl_router_p99_ms": pct(via["gaps_ms"], 99),
                   "itl_direct_p50_ms": pct(direct["gaps_ms"], 50), "itl_direct_p99_ms": pct(direct["gaps_ms"], 99), "direct_failed": direct["failed"]}
            row["added_p50_ms"] = row["itl_router_p50_ms"] - row["itl_direct_p50_ms"]
            row["added_p99_ms"] = row["itl_router_p99_ms"] - row["itl_direct_p99_ms"]
            rows.append(row)
            print_row(row)
            await asyncio.sleep(1.0)
    await channel.close()
    return rows


HEADER = (f"{'router':<8} {'streams':>7} {'ok':>5} {'fail':>5} {'RSS MiB':>8} {'threads':>7} {'CPU':>5} {'ITL p50 r/d':>13} {'ITL p99 r/d':>13} "
          f"{'added p50':>9} {'added p99':>9}")


def print_row(r: dict[str, Any]) -> None:
    print(f"{r['router']:<8} {r['streams']:>7} {r['ok']:>5} {r['failed']:>5} {r['router_rss_mib']:>8.0f} {r['router_threads']:>7} {r['router_cpu_cores']:>5.2f} "
          f"{r['itl_router_p50_ms']:>6.1f}/{r['itl_direct_p50_ms']:<6.1f} {r['itl_router_p99_ms']:>6.1f}/{r['itl_direct_p99_ms']:<6.1f} "
          f"{r['added_p50_ms']:>9.2f} {r['added_p99_ms']:>9.2f}", flush=True)
    if r["error_example"]:
        print(f"         e.g. {r['error_example']}")


def old_router_path(rev: str, tmp: Path) -> Path:
    """A folder from which (as the working directory of `python -m`) `splitserve.*` imports as
    the code of commit `rev`."""
    tree = tmp / "old-tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True, capture_output=True)
    pkg = tmp / "old-path" / "splitserve"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for folder in ("engine", "cluster", "router", "prefill_worker", "decode_worker", "kv_transfer", "proto"):
        (pkg / folder).symlink_to(tree / folder)
    return tmp / "old-path"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.router_concurrency", description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="100,500,1000,2000", help="concurrent streams per level")
    parser.add_argument("--ramp", type=float, default=400.0, help="streams opened per second")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between a stream's tokens at the worker")
    parser.add_argument("--compare-with", default=None, metavar="REV", help="also run the router of this git commit")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--paced-worker", nargs=3, metavar=("REDIS_URL", "CLUSTER", "INTERVAL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.paced_worker:
        paced_worker(args.paced_worker[0], args.paced_worker[1], float(args.paced_worker[2]))
        return 0
    logging.basicConfig(level=logging.WARNING)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2,000 sockets here, and as many in the router

    from splitserve.cluster.redis_server import EmbeddedRedis
    from splitserve.engine.tiny_checkpoint import TinySpec, write_tiny_checkpoint

    levels = [int(x) for x in args.levels.split(",")]
    children: list[Child] = []
    redis = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model = write_tiny_checkpoint(Path(tmp) / "model", TinySpec())
            redis = EmbeddedRedis(HOST)
            name = f"concurrency{os.getpid()}"
            worker = Child("paced worker", ["benchmarks.router_concurrency", "--paced-worker", redis.url, name, str(args.interval)])
            children.append(worker)
            worker_address = worker.wait_ready()["address"]
            config = {"name": name, "model": {"path": str(model), "dtype": "float32"}, "redis_url": redis.url,
                      "router": {"host": HOST, "http_port": 0, "grpc_port": 0}, "routing": {"local_prefill_tokens": 0}}
            (Path(tmp) / "cluster.yaml").write_text(yaml.safe_dump(config))
            routers: dict[str, tuple[dict, int]] = {}
            variants = [("current", None)] + ([(args.compare_with[:8], old_router_path(args.compare_with, Path(tmp)))] if args.compare_with else [])
            for label, path in variants:
                router = Child(f"router {label}", ["splitserve.router", "-f", str(Path(tmp) / "cluster.yaml")], path or ROOT)
                children.append(router)
                routers[label] = (router.wait_ready(), router.popen.pid)
            time.sleep(1.5)  # the routers' views have both roles
            print(f"paced worker {worker_address}: one token every {args.interval:g} s; streams opened at {args.ramp:g}/s; "
                  "ITL in ms through the router / directly, on the plateau")
            print(HEADER)
            rows = asyncio.run(measure(routers, worker_address, levels, args.ramp, args.interval))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))
        finally:
            for c in reversed(children):
                c.stop()
            if redis is not None:
                redis.stop()
            if args.compare_with:
                subprocess.run(["git", "worktree", "remove", "--force", str(Path(tmp) / "old-tree")], cwd=ROOT, capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
