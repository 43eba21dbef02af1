"""Routing policies compared on identical traces against a real cluster.

Setup, on 127.0.0.1, stopped at exit: an embedded redis-server, a random-weight Llama (hidden
384, 6 layers: big enough that a prompt's prefill costs real time on a CPU), and for each policy
a fresh cluster (empty caches) of 2 prefill + 2 decode workers started by hand and one router
(`router.policy` = the policy). The prefill workers share the first half of the CPUs, the
decode workers the second (so a prefill never steals a decode's core and the policies meet the
same machine); each prefill worker's KV cache holds 12,288 tokens, less than the trace's working
set, as in production. Each trace is replayed the same way under every policy:

  (a) chat: 16 conversations x 6 turns, in 4 tenant groups whose conversations share a
      1,000-token system prompt; a new conversation every 0.5 s, each turn sent 1 s after the
      previous reply (a user reading);
  (b) unrelated: 64 random prompts of 200-1,200 tokens, sent on one fixed Poisson schedule.

Printed per trace and policy: TTFT p50/p90/p99 and E2E p50 (the router's timings), KV bytes
moved per request, prefix hit rate on the prefill and on the decode pool (prompt tokens not
recomputed / not moved), requests prefilled locally, requests per worker (busiest / least busy
per pool), and the ratios of workload_aware to round_robin and to least_loaded.

    python -m benchmarks.routing
    python -m benchmarks.routing --traces chat --local-sweep 0,128,256,512   # choose routing.local_prefill_tokens
    python -m benchmarks.routing --traces chat --balance-sweep 1.15,1.3,1.5  # choose routing.balance_factor
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.procs import BenchCluster

POLICIES = ("round_robin", "least_loaded", "workload_aware")
MAX_TOKENS = 24


@dataclass
class Request:
    prompt: list[int]
    at: float = 0.0  # seconds after the trace starts (unrelated trace)


@dataclass
class Outcome:
    timings: dict[str, Any]
    prompt_tokens: int


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def words(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def chat_trace(seed: int, vocab: int, conversations: int = 16, turns: int = 6, groups: int = 4) -> list[list[list[int]]]:
    """Per conversation, its user messages (the first one after the group's system prompt)."""
    rng = random.Random(seed)
    systems = [words(rng, 1000, vocab) for _ in range(groups)]
    out = []
    for c in range(conversations):
        msgs = [words(rng, rng.randint(60, 120), vocab) for _ in range(turns)]
        out.append([systems[c % groups] + msgs[0], *msgs[1:]])
    return out


def unrelated_trace(seed: int, vocab: int, n: int = 64, rate: float = 3.0) -> list[Request]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(Request(words(rng, rng.randint(200, 1200), vocab), t))
    return out


async def run_chat(address: str, conversations: list[list[list[int]]], stagger: float = 0.5, think: float = 1.0) -> Run:
    from splitserve.proto.client import AsyncClient, SplitserveError

    run = Run()
    async with AsyncClient(address, timeout=600) as client:
        async def conversation(i: int, messages: list[list[int]]) -> None:
            await asyncio.sleep(i * stagger)
            history: list[int] = []
            for turn, msg in enumerate(messages):
                if turn:
                    await asyncio.sleep(think)
                prompt = history + msg
                try:
                    done = await client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
                except SplitserveError as e:
                    run.errors.append(f"{e.status}: {e}")
                    return
                run.outcomes.append(Outcome(done.timings, len(prompt)))
                history = prompt + done.token_ids

        await asyncio.gather(*(conversation(i, c) for i, c in enumerate(conversations)))
    return run


async def run_unrelated(address: str, requests: list[Request]) -> Run:
    from splitserve.proto.client import AsyncClient, SplitserveError

    run = Run()
    loop = asyncio.get_running_loop()
    async with AsyncClient(address, timeout=600) as client:
        start = loop.time()

        async def one(r: Request) -> None:
            await asyncio.sleep(max(0.0, start + r.at - loop.time()))
            try:
                done = await client.generate(r.prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
            except SplitserveError as e:
                run.errors.append(f"{e.status}: {e}")
                return
            run.outcomes.append(Outcome(done.timings, len(r.prompt)))

        await asyncio.gather(*(one(r) for r in requests))
    return run


def summarize(run: Run) -> dict[str, Any]:
    t = [o.timings for o in run.outcomes]
    ttft = [x["ttft"] * 1000 for x in t]
    disagg = [(o.timings, o.prompt_tokens) for o in run.outcomes if o.timings["path"] == "disaggregated"]
    prefill = Counter(x["prefill_worker"] for x in t if x["prefill_worker"])
    decode = Counter(x["decode_worker"] for x in t)

    def spread(c: Counter) -> str:
        return f"{max(c.values())}/{min(c.values())}" if len(c) >= 2 else f"{sum(c.values())}/0"

    return {
        "requests": len(t), "errors": len(run.errors), "error_example": run.errors[0] if run.errors else "",
        "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p90_ms": float(np.percentile(ttft, 90)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
        "e2e_p50_ms": float(np.percentile([x["e2e"] * 1000 for x in t], 50)),
        "kv_bytes_per_request": float(np.mean([x["kv_bytes"] for x in t])),
        "prefill_hit_rate": sum(x["prefill_cached_tokens"] for x, _ in disagg) / max(1, sum(n for _, n in disagg)),
        "decode_hit_rate": sum(x["decode_cached_tokens"] for x in t) / max(1, sum(o.prompt_tokens for o in run.outcomes)),
        "local": sum(x["path"] == "local" for x in t), "prefill_spread": spread(prefill), "decode_spread": spread(decode),
        "prefill_counts": dict(prefill), "decode_counts": dict(decode),
    }


def replay(trace: str, policy: str, routing: dict[str, Any], model: Path, redis_url: str, tmp: Path, seed: int, vocab: int) -> dict[str, Any]:
    cluster = BenchCluster(model, redis_url, tmp, {"router": {"policy": policy, "request_timeout_s": 600}, "routing": routing})
    workers = [("prefill", ["--max-prefill-chunk", "512", "--num-kv-blocks", "768"])] * 2 + [("decode", ["--num-kv-blocks", "4096"])] * 2
    n = os.cpu_count() or 2
    cpus = {"prefill": f"0-{max(0, n // 2 - 1)}", "decode": f"{n // 2}-{n - 1}"} if n >= 2 else None
    try:
        cluster.start(workers, cpus=cpus)
        if trace == "chat":
            run = asyncio.run(run_chat(cluster.grpc(), chat_trace(seed, vocab)))
        else:
            run = asyncio.run(run_unrelated(cluster.grpc(), unrelated_trace(seed, vocab)))
    finally:
        cluster.stop()
    return summarize(run)


HEADER = (f"{'policy':<22} {'TTFT p50':>9} {'p90':>8} {'p99':>8} {'E2E p50':>8} {'KV MB/req':>9} {'P hit':>6} {'D hit':>6} "
          f"{'local':>5} {'P max/min':>9} {'D max/min':>9} {'err':>4}")


def print_row(name: str, s: dict[str, Any]) -> None:
    print(f"{name:<22} {s['ttft_p50_ms']:>9.0f} {s['ttft_p90_ms']:>8.0f} {s['ttft_p99_ms']:>8.0f} {s['e2e_p50_ms']:>8.0f} "
          f"{s['kv_bytes_per_request'] / 2**20:>9.2f} {s['prefill_hit_rate']:>6.2f} {s['decode_hit_rate']:>6.2f} {s['local']:>5} "
          f"{s['prefill_spread']:>9} {s['decode_spread']:>9} {s['errors']:>4}", flush=True)
    if s["error_example"]:
        print(f"    e.g. {s['error_example'][:200]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.routing", description=__doc__.splitlines()[0])
    parser.add_argument("--traces", default="chat,unrelated")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--local-prefill-tokens", type=int, default=None, help="workload_aware's threshold (default: the config default)")
    parser.add_argument("--local-sweep", default=None, help="also run workload_aware at each of these thresholds, e.g. 0,128,256,512")
    parser.add_argument("--balance-sweep", default=None, help="also run workload_aware at each of these routing.balance_factor caps, e.g. 1.15,1.3,1.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from splitserve.cluster.config import RoutingSection
    from splitserve.cluster.redis_server import EmbeddedRedis
    from splitserve.engine.tiny_checkpoint import TinySpec, write_tiny_checkpoint

    local = RoutingSection().local_prefill_tokens if args.local_prefill_tokens is None else args.local_prefill_tokens
    spec = TinySpec(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=2, vocab_size=2048, max_position_embeddings=4096)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_checkpoint(Path(tmp) / "model", spec)
        redis = EmbeddedRedis()
        try:
            for trace in args.traces.split(","):
                print(f"\ntrace {trace}: " + ("16 conversations x 6 turns, 4 groups sharing a 1,000-token system prompt" if trace == "chat"
                                             else "64 unrelated prompts of 200-1,200 tokens, Poisson 3/s"))
                print(HEADER)
                runs = [(p, p, {"local_prefill_tokens": local}) for p in args.policies.split(",")]
                runs += [(f"workload_aware@{x}", "workload_aware", {"local_prefill_tokens": int(x)}) for x in (args.local_sweep or "").split(",") if x]
                runs += [(f"workload_aware@cap{x}", "workload_aware", {"local_prefill_tokens": local, "balance_factor": float(x)})
                         for x in (args.balance_sweep or "").split(",") if x]
                rows = report[trace] = {}
                for name, policy, routing in runs:
                    rows[name] = replay(trace, policy, routing, model, redis.url, Path(tmp), args.seed, spec.vocab_size)
                    print_row(name, rows[name])
                print_ratios(trace, rows)
        finally:
            redis.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def print_ratios(trace: str, rows: dict[str, dict[str, Any]]) -> None:
    wa = rows.get("workload_aware")
    if wa is None:
        return
    for base in ("round_robin", "least_loaded"):
        b = rows.get(base)
        if b is None:
            continue
        kv = wa["kv_bytes_per_request"] / b["kv_bytes_per_request"] if b["kv_bytes_per_request"] else float("nan")
        print(f"workload_aware / {base}: KV bytes moved {kv:.2f}x, TTFT p50 {wa['ttft_p50_ms'] / b['ttft_p50_ms']:.2f}x, "
              f"p90 {wa['ttft_p90_ms'] / b['ttft_p90_ms']:.2f}x, p99 {wa['ttft_p99_ms'] / b['ttft_p99_ms']:.2f}x, "
              f"E2E p50 {wa['e2e_p50_ms'] / b['e2e_p50_ms']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
