"""Router overhead: the latency one router process adds per request, and the request rate it
sustains, against the same prefill and decode worker processes driven directly, in one run.

Setup, all on 127.0.0.1 with ports from the OS and stopped at exit: a random-weight tiny Llama,
an embedded redis-server, one prefill and one decode worker (`python -m splitserve.cluster.worker_runtime`,
KV over gRPC) and a router (`python -m splitserve.router -f cluster.yaml`) that finds them through Redis.
1. Latency: N sequential greedy requests (short prompt, small max_tokens, EOS ignored) through
   the router (gRPC SDK `Client.generate`) and directly (`router.legs.run_disaggregated` on the
   same pair), alternating request by request so both share the machine's noise.
2. Ceiling: C closed-loop threads send 1-token, max_tokens=1 requests through the router for a
   fixed time, C = 1, 2, 4, ...; rate, latency, errors and each process's CPU (/proc/PID/stat).

    python -m benchmarks.router_overhead
    python -m benchmarks.router_overhead --requests 50 --duration 2 --concurrency 1,4,16 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from benchmarks.procs import Child
from splitserve.cluster.redis_server import EmbeddedRedis
from splitserve.cluster.worker_runtime import WorkerSpec
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.tiny_checkpoint import TinySpec, write_tiny_checkpoint
from splitserve.proto.client import Client, SplitserveError
from splitserve.router.legs import run_disaggregated

logger = logging.getLogger("benchmarks.router_overhead")

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
MODEL = TinySpec(arch="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=512)
REQUEST_TIMEOUT = 30.0
WARMUP = 10  # requests per path before measuring
TICK = os.sysconf("SC_CLK_TCK")
PROCS = ("router", "prefill", "decode", "redis", "loadgen")


# ---- processes ---------------------------------------------------------------------------
class Cluster:
    """Checkpoint, Redis, one prefill + one decode worker, one router; close() undoes whatever start() got to."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.children, self.redis, self.client, self.pair = tmp, {}, None, None, ()

    def start(self, deadline: float) -> None:
        model = write_tiny_checkpoint(self.tmp / "model", MODEL)
        self.redis = EmbeddedRedis(HOST)
        name = f"routerbench{os.getpid()}"  # the Redis namespace: unique per run
        for role in ("prefill", "decode"):  # both load their engines at once
            spec = WorkerSpec(role=role, worker_id=f"{role}-0", cluster=name, redis_url=self.redis.url, model=str(model),
                              dtype="float32", kv_cache_memory=64 << 20, transport="grpc", host=HOST)
            self.children[role] = Child(role, ["splitserve.cluster.worker_runtime", spec.to_json()])
        addresses = [self.children[r].wait_ready(deadline - time.monotonic())["address"] for r in ("prefill", "decode")]
        config = {"name": name, "model": {"path": str(model), "dtype": "float32", "device": "cpu"}, "redis_url": self.redis.url,
                  "kv_transfer": {"transport": "grpc"}, "router": {"host": HOST, "http_port": 0, "grpc_port": 0},
                  "routing": {"local_prefill_tokens": 0}}  # the same two legs as the direct path
        (self.tmp / "cluster.yaml").write_text(yaml.safe_dump(config))
        self.children["router"] = Child("router", ["splitserve.router", "-f", str(self.tmp / "cluster.yaml"), "--redis-url", self.redis.url,
                                                   "--http-port", "0", "--grpc-port", "0"])
        self.client = Client(self.children["router"].wait_ready(deadline - time.monotonic())["grpc"], timeout=REQUEST_TIMEOUT)
        self.pair = tuple(addresses)
        while True:  # both workers ready in the registry, then a first request through the router
            try:
                if {("prefill", "ready"), ("decode", "ready")} <= {(w.role, w.state) for w in self.client.status().workers}:
                    self.client.generate([5], max_tokens=1, temperature=0.0, timeout=5)
                    return
            except SplitserveError as e:  # UNAVAILABLE until the router's view has both
                logger.debug("not routable yet: %s", e)
            if time.monotonic() > deadline:
                raise TimeoutError("the workers did not become routable through the router")
            time.sleep(0.2)

    def pids(self) -> dict[str, int]:
        return {**{n: c.popen.pid for n, c in self.children.items()}, "redis": self.redis.proc.pid, "loadgen": os.getpid()}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for child in reversed(self.children.values()):  # router first, then the workers
            child.stop()
        if self.redis is not None:
            self.redis.stop()


# ---- measuring ---------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s, k = sorted(xs), (len(xs) - 1) * q / 100
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, all threads


def machine_busy_seconds() -> float:
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(v) - v[3] - v[4]) / TICK  # all but idle and iowait, summed over CPUs


def measure_latency(c: Cluster, n: int, prompt_len: int, max_tokens: int) -> dict[str, Any]:
    prompt = [10 + i % 400 for i in range(prompt_len)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def router() -> tuple[list[int], float]:
        out = c.client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return out.token_ids, float(out.timings.get("e2e", 0.0))

    def direct() -> tuple[list[int], float]:
        return run_disaggregated(*c.pair, f"direct-{uuid.uuid4().hex}", prompt, params, transport="grpc", timeout=REQUEST_TIMEOUT).token_ids, 0.0

    for _ in range(WARMUP):
        router(), direct()
    lat: dict[str, list[float]] = {"router": [], "direct": []}
    inside, same = [], 0
    for i in range(n):
        tokens = {}
        for name, fn in [("router", router), ("direct", direct)][:: 1 if i % 2 == 0 else -1]:  # alternate who goes first
            t0 = time.perf_counter()
            tokens[name], internal = fn()
            lat[name].append(time.perf_counter() - t0)
            if name == "router":
                inside.append(internal)
        same += tokens["router"] == tokens["direct"]
    stats = {k: {"p50": pct(v, 50), "p99": pct(v, 99), "mean": sum(v) / n} for k, v in lat.items()}
    return {"requests": n, "prompt_tokens": prompt_len, "max_tokens": max_tokens, **stats,
            "router_internal_e2e_p50": pct(inside, 50), "outputs_identical": same, "samples_s": lat}


def load_level(c: Cluster, concurrency: int, duration: float) -> dict[str, Any]:
    """Closed loop: `concurrency` threads, each one request at a time, for `duration` seconds."""
    done: list[tuple[float, float]] = []  # (finish time since start, latency); list.append is atomic
    errors: collections.Counter[str] = collections.Counter()
    pids, start = c.pids(), time.perf_counter()

    def loop() -> None:
        while (t0 := time.perf_counter()) < start + duration:
            try:
                c.client.generate([5], max_tokens=1, temperature=0.0, ignore_eos=True)
            except Exception as e:  # counted, not fatal: this is a load test
                errors[getattr(e, "status", type(e).__name__)] += 1
            else:
                done.append(((now := time.perf_counter()) - start, now - t0))

    cpu0, busy0 = {k: cpu_seconds(p) for k, p in pids.items()}, machine_busy_seconds()
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + REQUEST_TIMEOUT + 5)
    wall = time.perf_counter() - start
    lat, n_err = [d for _, d in done], sum(errors.values())
    halves = [sum(1 for t, _ in done if lo <= t < hi) for lo, hi in ((0, duration / 2), (duration / 2, duration))]
    return {"concurrency": concurrency, "seconds": wall, "ok": len(done), "errors": dict(errors), "rps": len(done) / wall,
            "success": len(done) / max(1, len(done) + n_err), "p50": pct(lat, 50), "p99": pct(lat, 99),
            "held": halves[1] >= 0.9 * halves[0],  # the rate did not fall within the window
            "cpu_cores": {k: (cpu_seconds(p) - cpu0[k]) / wall for k, p in pids.items()},
            "machine_busy_cores": (machine_busy_seconds() - busy0) / wall}


def measure_ceiling(c: Cluster, levels: list[int], duration: float, deadline: float) -> dict[str, Any]:
    rows = []
    for conc in levels:
        if time.monotonic() + duration + 5 > deadline:
            logger.warning("--timeout near: skipping concurrency %s and above", conc)
            break
        logger.info("load: concurrency %d for %g s", conc, duration)
        rows.append(load_level(c, conc, duration))
    best = max((r for r in rows if r["success"] >= 0.95 and r["held"]), key=lambda r: r["rps"], default=None)
    return {"duration": duration, "levels": rows, "best": best}


# ---- report ------------------------------------------------------------------------------
def print_report(report: dict[str, Any]) -> None:
    lat, ceil, cpus = report["latency"], report["ceiling"], report["cpus"]
    ms = lambda x: f"{x * 1e3:8.2f}"  # noqa: E731
    print(f"\n$ {report['command']}\nmodel: tiny Llama ({MODEL.num_layers} layers, hidden {MODEL.hidden_size}, vocab "
          f"{MODEL.vocab_size}, float32, CPU); 1 prefill + 1 decode worker (KV over gRPC), 1 router; {cpus} CPUs, "
          f"load average {report['load_average'][0]:.2f} at start, {report['load_average'][1]:.2f} at end")
    print(f"\n1. Latency: {lat['requests']} sequential requests per path, alternating "
          f"({lat['prompt_tokens']}-token prompt, max_tokens={lat['max_tokens']}, greedy)")
    print(f"{'path':<28}{'p50 ms':>8}{'p99 ms':>9}{'mean ms':>9}")
    for name, label in (("direct", "direct (run_disaggregated)"), ("router", "router (Client.generate)")):
        print(f"{label:<28}{ms(lat[name]['p50'])} {ms(lat[name]['p99'])} {ms(lat[name]['mean'])}")
    r, d = lat["router"], lat["direct"]
    print(f"router - direct: p50 {(r['p50'] - d['p50']) * 1e3:+.2f} ms, p99 {(r['p99'] - d['p99']) * 1e3:+.2f} ms; "
          f"router / direct: p50 {r['p50'] / d['p50']:.2f}x, p99 {r['p99'] / d['p99']:.2f}x")
    print(f"router's own e2e (its Timings) p50 {lat['router_internal_e2e_p50'] * 1e3:.2f} ms; "
          f"same tokens on both paths: {lat['outputs_identical']}/{lat['requests']}")
    print(f"\n2. Router ceiling: closed loop, 1-token prompt, max_tokens=1, {ceil['duration']:g} s per level. CPU columns: "
          f"cores used (1.00 = one core); other = busy cores outside these processes; busy = share of all {cpus} CPUs;\n"
          "held = the window's 2nd half completed >= 90% of its 1st half's requests")
    print(f"{'conc':>4}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'ok':>7}{'errors':>7}{'held':>5}"
          + "".join(f"{p:>8}" for p in (*PROCS, "other")) + f"{'busy':>6}")
    for row in ceil["levels"]:
        other = max(0.0, row["machine_busy_cores"] - sum(row["cpu_cores"].values()))
        print(f"{row['concurrency']:>4}{row['rps']:>8.1f} {ms(row['p50'])} {ms(row['p99'])}{row['success']:>7.1%}"
              f"{sum(row['errors'].values()):>7}{'yes' if row['held'] else 'no':>5}"
              + "".join(f"{row['cpu_cores'][p]:>8.2f}" for p in PROCS) + f"{other:>8.2f}{row['machine_busy_cores'] / cpus:>6.0%}")
    if errs := {k: v for row in ceil["levels"] for k, v in row["errors"].items()}:
        print(f"error kinds: {errs}")
    if (best := ceil["best"]) is None:
        print("best sustained rate: none (no level had >= 95% success and a rate that held over its window)")
    else:
        share = best["cpu_cores"]["router"] / max(1e-9, best["machine_busy_cores"])
        print(f"best sustained rate: {best['rps']:.1f} req/s at concurrency {best['concurrency']} (>= 95% success, rate held); "
              f"there the router used {best['cpu_cores']['router']:.2f} cores = {share:.0%} of the machine's busy CPU, "
              f"machine {best['machine_busy_cores'] / cpus:.0%} busy")
    print(f"note: on this {cpus}-CPU machine router, workers, Redis and this load generator share the CPUs, so the ceiling "
          "is the whole system's. The router (one Python process, one GIL) is the bottleneck if it sits near 1.00 core; "
          "well below that with the machine near 100% busy, the shared CPUs are.")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.router_overhead", description="Latency one router adds per request, and the rate it sustains, against the same workers driven directly.")
    p.add_argument("--requests", type=int, default=200, help="sequential requests per path for the latency comparison")
    p.add_argument("--prompt-len", type=int, default=8, help="prompt tokens for the latency comparison")
    p.add_argument("--max-tokens", type=int, default=8, help="output tokens for the latency comparison")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per concurrency level")
    p.add_argument("--concurrency", default="1,2,4,8,16,32", help="closed-loop levels, comma-separated")
    p.add_argument("--timeout", type=float, default=600.0, help="bound on the whole run, seconds")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if args.requests < 1 or args.prompt_len < 1 or args.max_tokens < 1 or args.duration <= 0 or min(args.concurrency or [0]) < 1:
        p.error("--requests, --prompt-len, --max-tokens, --duration and every --concurrency level must be > 0")
    return args


def _raise(signum: int, _frame: object) -> None:
    raise TimeoutError("--timeout exceeded") if signum == signal.SIGALRM else KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    command = shlex.join(["python", "-m", "benchmarks.router_overhead", *argv])
    deadline, load_start = time.monotonic() + args.timeout, os.getloadavg()[0]
    for sig in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):  # SIGINT too: it may have been inherited as ignored
        signal.signal(sig, _raise)
    signal.setitimer(signal.ITIMER_REAL, args.timeout)
    with tempfile.TemporaryDirectory(prefix="router-overhead-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            logger.info("starting redis, workers and router in %s", tmp)
            cluster.start(min(deadline, time.monotonic() + 180))
            logger.info("latency: %d requests per path, alternating", args.requests)
            latency = measure_latency(cluster, args.requests, args.prompt_len, args.max_tokens)
            ceiling = measure_ceiling(cluster, args.concurrency, args.duration, deadline)
        except (TimeoutError, KeyboardInterrupt) as e:
            logger.error("stopped: %s", e or "interrupted")
            return 130 if isinstance(e, KeyboardInterrupt) else 124
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            cluster.close()
    report = {"command": command, "args": {**vars(args), "json": str(args.json) if args.json else None},
              "cpus": os.cpu_count(), "load_average": [load_start, os.getloadavg()[0]], "latency": latency, "ceiling": ceiling}
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
