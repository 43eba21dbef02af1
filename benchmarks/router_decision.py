"""The cost of one routing decision in a large cluster, and the prefix index's memory.

A synthetic cluster, in this process: 1,000 workers (500 prefill, 500 decode) with heartbeat
loads, and a prefix index holding 1,000,000 block hashes (4,000 cached documents of 250 blocks,
each held by 3 workers, as the KV events would have put them there). Each decision routes a
4,096-token prompt (256 blocks) whose first part is one of the cached documents: the router
hashes its blocks, matches them in the index and the workload_aware policy picks the pair. The
baseline in the same run is round_robin's decision on the same snapshot (no index). Hashing the
prompt's blocks (a sha256 chain) is part of preparing a request, like tokenizing it, and is
reported on its own line.

    python -m benchmarks.router_decision
    python -m benchmarks.router_decision --workers 1000 --blocks 1000000 --decisions 2000
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

from splitserve.engine.block_pool import block_hashes
from splitserve.router.policy import RouteRequest, Snapshot, WorkerLoad, make_policy
from splitserve.router.prefix_index import PrefixIndex

BLOCK = 16


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(workers: int, blocks: int, doc_blocks: int, holders: int, seed: int) -> tuple[Snapshot, PrefixIndex, list[list[int]], float, int]:
    rng = random.Random(seed)
    half = workers // 2
    loads = [WorkerLoad(f"p{i}", "prefill", f"10.0.{i // 250}.{i % 250}:9000", queued_prefill_tokens=rng.randrange(0, 8000),
                        free_blocks=rng.randrange(1000, 20000)) for i in range(half)]
    loads += [WorkerLoad(f"d{i}", "decode", f"10.1.{i // 250}.{i % 250}:9000", used_blocks=rng.randrange(0, 20000),
                         free_blocks=rng.randrange(1000, 20000)) for i in range(workers - half)]
    snapshot = Snapshot.of(loads)
    docs = [[rng.randrange(3, 32000) for _ in range(doc_blocks * BLOCK)] for _ in range(blocks // doc_blocks)]
    gc.collect()
    before = rss()
    start = time.perf_counter()
    index = PrefixIndex(capacity=blocks)
    for doc in docs:
        hashes = block_hashes(doc, BLOCK)
        for w in rng.sample(loads, holders):
            index.add(w.worker_id, hashes)
    build_s = time.perf_counter() - start
    gc.collect()
    return snapshot, index, docs, build_s, rss() - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.router_decision", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=1_000_000, help="block hashes in the index")
    parser.add_argument("--doc-blocks", type=int, default=250)
    parser.add_argument("--holders", type=int, default=3, help="workers caching each document")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    snapshot, index, docs, build_s, index_bytes = build(args.workers, args.blocks, args.doc_blocks, args.holders, args.seed)
    print(f"index: {len(index):,} block hashes over {len(index.workers())} workers; built in {build_s:.1f} s; "
          f"memory {index_bytes / 2**20:.0f} MiB (process RSS growth)")
    rng = random.Random(args.seed + 1)
    policies = {"workload_aware": make_policy("workload_aware", index=index, local_prefill_tokens=256),
                "round_robin": make_policy("round_robin")}
    times: dict[str, list[float]] = {"hash": [], "match": [], "workload_aware": [], "round_robin": [], "total": []}
    hits = 0
    for i in range(args.decisions):
        doc = docs[rng.randrange(len(docs))]
        keep = rng.randrange(BLOCK, len(doc))
        prompt = doc[:keep] + [rng.randrange(3, 32000) for _ in range(max(0, args.prompt_tokens - keep))]
        prompt = prompt[: args.prompt_tokens]
        t0 = time.perf_counter()
        hashes = tuple(block_hashes(prompt, BLOCK))
        t1 = time.perf_counter()
        matched = index.match(hashes)
        t2 = time.perf_counter()
        route = policies["workload_aware"].choose(snapshot, RouteRequest(f"r{i}", len(prompt), 64, block_hashes=hashes))
        t3 = time.perf_counter()
        policies["round_robin"].choose(snapshot, RouteRequest(f"r{i}", len(prompt), 64))
        t4 = time.perf_counter()
        hits += route.decode_cached_blocks > 0 or route.prefill_cached_blocks > 0
        for name, dt in (("hash", t1 - t0), ("match", t2 - t1), ("workload_aware", t3 - t2), ("round_robin", t4 - t3),
                         ("total", (t1 - t0) + (t3 - t2))):
            times[name].append(dt * 1e6)
        assert matched, "every prompt starts with a cached document"
    print(f"{args.decisions} decisions for {args.prompt_tokens}-token prompts ({args.prompt_tokens // BLOCK} blocks); "
          f"{hits} routed to a worker caching a prefix")
    print(f"{'step (µs)':<40} {'p50':>8} {'p99':>8}")
    labels = {"workload_aware": "workload_aware decision (match + choose)", "round_robin": "round_robin decision (baseline)",
              "match": "the index match alone (a separate call)", "hash": "hashing the prompt's blocks (per request)",
              "total": "hashing + workload_aware decision"}
    for name, label in labels.items():
        print(f"{label:<40} {np.percentile(times[name], 50):>8.0f} {np.percentile(times[name], 99):>8.0f}")
    wa, rr = np.percentile(times["workload_aware"], 99), np.percentile(times["round_robin"], 99)
    print(f"workload_aware / round_robin p99: {wa / rr:.1f}x; goal p99 <= 1,000 µs: {'met' if wa <= 1000 else 'missed'}; "
          f"index memory goal <= 1 GiB: {'met' if index_bytes <= 2**30 else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
