"""Soak: thousands of mixed requests against `splitserve serve`, with a decode worker and a
prefill worker killed along the way. Nothing may hang, no KV block may stay reserved, and the
processes' memory should stay flat.

Setup: `splitserve serve` (embedded Redis, local Ray) on a tiny random-weight model with 2
prefill and 2 decode workers and `router.max_retries: 2`. The load, from this process, with
`--concurrency` requests in flight: gRPC (the SDK, streaming or not), HTTP (httpx, streaming or
not), requests with stop strings, requests aborted midway (the Abort RPC), clients that hang up
mid-stream, and invalid requests (expected to be refused with 400 / INVALID_ARGUMENT). A third
of the way through a decode worker is SIGKILLed, two thirds through a prefill worker (Ray
restarts both; requests on them fail over or retry).

Printed: requests by kind and outcome, requests that hung (over `--request-timeout`; none are
allowed), KV blocks left reserved on any worker once the load is gone (none allowed), and the
RSS of the serve process (router, controller, Ray driver) and of each worker at the start and
the end. Exit status 1 if anything hung or leaked.

    python -m benchmarks.soak                        # 5,000 requests, ~5 minutes on 2 cores
    python -m benchmarks.soak --requests 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

from benchmarks.procs import ROOT

KINDS = {"grpc": 30, "grpc_stream": 20, "http": 15, "http_stream": 10, "stop_string": 8, "abort": 5, "hang_up": 5, "invalid": 7}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Serve:
    def __init__(self, model: Path, tmp: Path) -> None:
        cfg = tmp / "cluster.yaml"
        cfg.write_text(yaml.safe_dump({"model": {"path": str(model), "dtype": "float32"}, "prefill": {"replicas": 2}, "decode": {"replicas": 2},
                                       "router": {"max_retries": 2, "http_port": 0, "grpc_port": 0}, "heartbeat_seconds": 0.5,
                                       "heartbeat_ttl_seconds": 3.0, "name": f"soak{os.getpid()}"}))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.popen = subprocess.Popen([sys.executable, "-m", "splitserve.cluster.cli", "serve", "--config", str(cfg)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.log: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            for line in self.popen.stdout:
                self.log = (self.log + [line.rstrip()])[-80:]
                m = re.search(r"splitserve ready: http (\S+)\s+grpc (\S+)", line)
                if m:
                    self.http, self.grpc = m.group(1), m.group(2)
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(300):
            self.stop()
            raise RuntimeError("serve did not start:\n" + "\n".join(self.log))

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGINT)
            try:
                self.popen.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)


def workers(grpc_address: str):
    from splitserve.proto.client import Client

    with Client(grpc_address) as c:
        return list(c.status().workers)


async def one(kind: str, i: int, rng: random.Random, grpc_client, http: httpx.AsyncClient, base: str) -> str:
    """Run one request of this kind; returns its outcome."""
    from splitserve.proto.client import SplitserveError

    prompt = " ".join(rng.choice(["prefill", "decode", "router", "cache", "token", "block", "stream"]) for _ in range(rng.randint(3, 60)))
    max_tokens = rng.randint(4, 48)
    try:
        if kind == "grpc":
            done = await grpc_client.generate(prompt, max_tokens=max_tokens, temperature=rng.choice([0.0, 0.8]), seed=i)
            return f"ok:{done.finish_reason}"
        if kind == "grpc_stream":
            n = 0
            async for chunk in grpc_client.generate_stream(prompt, max_tokens=max_tokens, temperature=0.0):
                n += len(chunk.token_ids)
            return "ok:stream"
        if kind in ("http", "stop_string"):
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            if kind == "stop_string":
                body["stop"] = [" the", "e", "\n"]
            r = await http.post(f"{base}/v1/completions", json=body)
            return f"ok:{r.json()['choices'][0]['finish_reason']}" if r.status_code == 200 else f"http:{r.status_code}"
        if kind in ("http_stream", "hang_up"):
            body = {"prompt": prompt, "max_tokens": 200 if kind == "hang_up" else max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
            events = 0
            async with http.stream("POST", f"{base}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return f"http:{r.status_code}"
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        if '"error"' in line[:20]:
                            return "error:in-band"
                        events += 1
                        if kind == "hang_up" and events == 3:
                            return "hung_up"  # leaving the block closes the connection mid-stream
                    elif line == "data: [DONE]":
                        return "ok:stream"
            return "error:no [DONE]"
        if kind == "abort":
            rid = f"soak-abort-{i}"
            stream = grpc_client.generate_stream(prompt, request_id=rid, max_tokens=3000, temperature=0, ignore_eos=True)
            got = 0
            try:
                async for _ in stream:
                    got += 1
                    if got == 2:
                        await grpc_client.abort(rid)
            except SplitserveError as e:
                return f"aborted:{e.status}"
            return "error:not aborted"
        if kind == "invalid":
            bad = rng.choice([{"prompt": "", "max_tokens": 4}, {"prompt": "x", "max_tokens": -3}, {"prompt": "x", "temperature": "hot"},
                              {"prompt": "x", "top_p": 7}, {"max_tokens": 2}, {"prompt": [10**9]}])
            r = await http.post(f"{base}/v1/completions", json=bad)
            return "refused:400" if r.status_code == 400 else f"error:http {r.status_code} for invalid input"
    except SplitserveError as e:
        return f"error:{e.status}"
    except httpx.HTTPError as e:
        return f"error:{type(e).__name__}"
    raise AssertionError(kind)


async def load(serve: Serve, n: int, concurrency: int, timeout: float, seed: int, kills: list[tuple[int, str]]) -> tuple[Counter, list[str]]:
    from splitserve.proto.client import AsyncClient

    rng = random.Random(seed)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=n)
    outcomes: Counter = Counter()
    hung: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i, k in enumerate(kinds):
        queue.put_nowait((i, k))
    done = 0
    async with AsyncClient(serve.grpc, timeout=timeout) as grpc_client, httpx.AsyncClient(timeout=timeout) as http:
        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                i, kind = queue.get_nowait()
                for at, role in kills:
                    if i == at:
                        kill_one(serve, role)
                try:
                    outcome = await asyncio.wait_for(one(kind, i, random.Random(seed * 100003 + i), grpc_client, http, serve.http), timeout)
                except asyncio.TimeoutError:
                    outcome = "HUNG"
                    hung.append(f"{kind} #{i}")
                outcomes[(kind, outcome)] += 1
                done += 1
                if done % 500 == 0:
                    print(f"  {done}/{n} requests", flush=True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes, hung


def kill_one(serve: Serve, role: str) -> None:
    victim = next(w for w in workers(serve.grpc) if w.role == role and w.state == "ready")
    print(f"  killing {role} worker {victim.worker_id} (pid {victim.pid})", flush=True)
    os.kill(victim.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--request-timeout", type=float, default=120.0, help="a request taking longer than this counts as hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)

    from splitserve.engine.tiny_checkpoint import TinySpec, write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_checkpoint(Path(tmp) / "model", TinySpec(max_position_embeddings=4096))
        serve = Serve(model, Path(tmp))
        try:
            start = {w.worker_id: (w.role, rss_mib(w.pid)) for w in workers(serve.grpc)}
            serve_start = rss_mib(serve.popen.pid)
            began = time.monotonic()
            kills = [(args.requests // 3, "decode"), (2 * args.requests // 3, "prefill")]
            outcomes, hung = asyncio.run(load(serve, args.requests, args.concurrency, args.request_timeout, args.seed, kills))
            wall = time.monotonic() - began
            deadline = time.monotonic() + 120
            while True:  # the load is gone: the killed workers back (Ray restarts them), and every worker holding nothing
                ws = workers(serve.grpc)
                if (len([w for w in ws if w.state == "ready"]) == len(start) and all(w.reserved_blocks == 0 and w.running == 0 for w in ws)
                        or time.monotonic() > deadline):
                    break
                time.sleep(0.5)
            leaked = {w.worker_id: w.reserved_blocks for w in ws if w.reserved_blocks}
            print(f"\n{args.requests} requests in {wall:.0f} s ({args.requests / wall:.1f} req/s), {args.concurrency} at a time")
            print(f"{'kind':<13} {'outcome':<34} {'requests':>8}")
            for (kind, outcome), count in sorted(outcomes.items()):
                print(f"{kind:<13} {outcome:<34} {count:>8}")
            print(f"hung: {len(hung)} {hung[:5]}")
            print(f"reserved KV blocks left: {sum(leaked.values())} {leaked}")
            print(f"RSS MiB, start -> end: serve process (router, controller, Ray driver) {serve_start:.0f} -> {rss_mib(serve.popen.pid):.0f}")
            for w in ws:
                before = start.get(w.worker_id)
                label = f"{before[1]:.0f}" if before and w.restarts == 0 else "(restarted)"
                print(f"  {w.role:<8} {w.worker_id:<34} {label} -> {rss_mib(w.pid):.0f}  (restarts {w.restarts})")
            report = {"requests": args.requests, "wall_s": wall, "outcomes": {f"{k}|{o}": c for (k, o), c in outcomes.items()}, "hung": hung,
                      "leaked": leaked}
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2))
            return 1 if hung or leaked else 0
        finally:
            serve.stop()


if __name__ == "__main__":
    sys.exit(main())
