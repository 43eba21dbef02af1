"""Context-parallel prefill on this machine: CP = 1 vs CP = 2, and pass-KV vs pass-Q by cache-hit rate.

Setup: a random-weight Llama-shaped checkpoint written here (hidden 256, 4 layers, 8 heads, 2 KV
heads, intermediate 512, float32) that every rank loads with `load_model`. Ranks are processes
(torch.multiprocessing spawn), one thread each, joined by a TCPStore + ProcessGroupGloo on
127.0.0.1 with a port from the OS; CP = 1 and CP = 2 run one after the other, never together.
1. Prefill: per prompt length, every rank runs the model over its load-balanced shard as
   `CPRank._forward` does (embed -> per layer: input_layernorm, self_attn.project, ring_attention,
   o_proj, residual, mlp(post_attention_layernorm), residual -> last-position logits on the rank
   holding it) but pushes NO KV (no decode worker) and skips its per-layer abort all-reduce.
   CP = 1 is the same code on a ring of one. Time: barrier -> forward -> slowest rank. Memory:
   each rank's peak RSS (VmHWM, reset after the model is loaded) minus its RSS at that moment.
2. Variants: CP = 2, a fixed total context of P cached tokens (random K/V sharded over the ranks)
   and T new ones (load-balanced); one layer's ring_attention (random q, k, v, the model's head
   counts) per variant, and what `choose_variant` picks with the default LinkModel and with one
   measured here at startup (gloo send bandwidth rank 0 -> 1, attend_block FLOP/s on both ranks).

    python -m benchmarks.cp_scaling                                  # 16k and 32k tokens
    python -m benchmarks.cp_scaling --lengths 4096 --context 4096    # quick look
    python -m benchmarks.cp_scaling --lengths 8192 --json cp.json
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import datetime
import json
import logging
import math
import os
import shlex
import signal
import tempfile
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from splitserve.cluster.net import free_port
from splitserve.engine.loader import load_model
from splitserve.engine.tiny_checkpoint import TinySpec, write_tiny_checkpoint
from splitserve.prefill_worker.ring_attention import (
    LinkModel,
    Ring,
    attend_block,
    choose_variant,
    positions_of,
    ring_attention,
    shard_ranges,
)

logger = logging.getLogger("benchmarks.cp_scaling")
HOST, BLOCK, MLP_CHUNK = "127.0.0.1", 16, 2048  # block size and MLP chunk: CPRank's defaults
MODEL = {"hidden_size": 256, "intermediate_size": 512, "num_layers": 4, "num_heads": 8, "num_kv_heads": 2, "vocab_size": 512}
LINK_BYTES = 64 << 20


# ---- inside a rank --------------------------------------------------------------------------
def status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return that RSS: the baseline."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


def reduce(ring: Ring, x: float, op: dist.ReduceOp = dist.ReduceOp.MAX) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    opts = dist.AllreduceOptions()
    opts.reduceOp = op
    ring.pg.allreduce([t], opts).wait()
    return float(t.item())


def gather(ring: Ring, values: list[float]) -> list[list[float]]:
    out = [torch.zeros(len(values), dtype=torch.float64) for _ in range(ring.world)]
    ring.pg.allgather([out], [torch.tensor(values, dtype=torch.float64)]).wait()
    return [t.tolist() for t in out]


@torch.inference_mode()
def forward_shard(model, ring: Ring, prompt: torch.Tensor, variant: str) -> torch.Tensor | None:
    """CPRank._forward without the KV push: this rank's shard through every layer; the last
    position's logits [1, vocab] on the rank holding it, None elsewhere."""
    pos = positions_of(shard_ranges(len(prompt), ring.world, BLOCK)[ring.rank])
    m, scale = model.model, model.config.head_dim ** -0.5
    h = m.embed_tokens(prompt[pos])  # [t, hidden], this rank's tokens only
    rope = m.rotary_emb(pos, h.dtype)
    for layer in m.layers:
        q, k, v = layer.self_attn.project(layer.input_layernorm(h), rope)
        out, _ = ring_attention(ring, q, k, v, pos, pos, scale, variant)  # [t, H, D] float32
        h = h + layer.self_attn.o_proj(out.to(h.dtype).flatten(1))
        h = h + layer.mlp(layer.post_attention_layernorm(h), MLP_CHUNK)
    hit = (pos == len(prompt) - 1).nonzero()
    if not len(hit):
        return None
    last = int(hit[0, 0])
    return model.lm_head(m.norm(h[last : last + 1])).float()


def prefill(model, ring: Ring, n: int) -> dict[str, Any]:
    c = model.config
    prompt = torch.randint(0, c.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
    variant = choose_variant(n, 0, ring.world, c.num_heads, c.num_kv_heads, c.head_dim, 4)  # as CPRank.run
    base = reset_peak()
    reduce(ring, 0.0)  # barrier
    t0 = time.perf_counter()
    logits = forward_shard(model, ring, prompt, variant)
    mine = time.perf_counter() - t0
    reduce(ring, 0.0)
    wall = time.perf_counter() - t0
    per_rank = gather(ring, [mine, status_bytes("VmHWM") - base])
    row = {"tokens": n, "cp": ring.world, "variant": variant, "time_s": wall, "rank_time_s": [p[0] for p in per_rank],
           "peak_increase_bytes": [p[1] for p in per_rank]}
    return row if logits is None else {**row, "logits": logits[0].tolist()}  # rank 0: it holds the last chunk


def measure_link(ring: Ring, heads: int, kv_heads: int, head_dim: int) -> dict[str, float]:
    """gloo send bandwidth rank 0 -> 1 (64 MiB, one-byte ack, best of 3) and attend_block FLOP/s
    (1024 queries x 4096 visible keys, both ranks at once as in the ring, mean of the ranks)."""
    buf, ack, best = torch.empty(LINK_BYTES, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8), math.inf
    for i in range(4):
        reduce(ring, 0.0)
        t0 = time.perf_counter()
        if ring.rank == 0:
            ring.pg.send([buf], 1, 7).wait()
            ring.pg.recv([ack], 1, 8).wait()
        else:
            ring.pg.recv([buf], 0, 7).wait()
            ring.pg.send([ack], 0, 8).wait()
        best = min(best, time.perf_counter() - t0) if i else best  # the first one warms up
    bandwidth = reduce(ring, LINK_BYTES / best, dist.ReduceOp.MIN)
    g = torch.Generator().manual_seed(ring.rank)
    q, k, v = (torch.randn(n, h, head_dim, generator=g) for n, h in ((1024, heads), (4096, kv_heads), (4096, kv_heads)))
    attend_block(q[:64], k[:64], v[:64], torch.arange(64), torch.arange(64), 0.1)
    reduce(ring, 0.0)
    t0 = time.perf_counter()
    attend_block(q, k, v, torch.arange(4096, 5120), torch.arange(4096), head_dim ** -0.5)
    flops = 4 * 1024 * 4096 * heads * head_dim / (time.perf_counter() - t0)
    return {"bandwidth": bandwidth, "flops": reduce(ring, flops, dist.ReduceOp.SUM) / ring.world}


def variant_sweep(ring: Ring, c, context: int, rates: list[float], repeats: int, link: LinkModel) -> list[dict[str, Any]]:
    rows, (r, w), scale = [], (ring.rank, ring.world), c.head_dim ** -0.5
    x, pos = torch.randn(16, c.num_heads, c.head_dim), torch.arange(16) + 16 * r
    for variant in ("pass_kv", "pass_q"):  # warm-up
        ring_attention(ring, x, x[:, : c.num_kv_heads], x[:, : c.num_kv_heads], pos, pos, scale, variant)
    for rate in rates:
        p = min(context - BLOCK, round(context * rate / BLOCK) * BLOCK)
        t = context - p
        mine = positions_of(shard_ranges(t, w, BLOCK)[r], p)  # new tokens, load-balanced
        k_pos = torch.cat([positions_of([(p * r // w, p * (r + 1) // w)]), mine])  # cached shard + new
        g = torch.Generator().manual_seed(1000 * r + int(rate * 100))
        q = torch.randn(len(mine), c.num_heads, c.head_dim, generator=g)
        k, v = (torch.randn(len(k_pos), c.num_kv_heads, c.head_dim, generator=g) for _ in range(2))
        row: dict[str, Any] = {"hit_rate": rate, "new": t, "cached": p}
        for variant in ("pass_kv", "pass_q"):
            best = math.inf
            for _ in range(repeats):
                reduce(ring, 0.0)
                t0 = time.perf_counter()
                ring_attention(ring, q, k, v, mine, k_pos, scale, variant)
                best = min(best, reduce(ring, time.perf_counter() - t0))
            row[variant + "_s"] = best
        shape = (t, p, w, c.num_heads, c.num_kv_heads, c.head_dim, 4)
        row.update(choose_default=choose_variant(*shape), choose_measured=choose_variant(*shape, link))
        rows.append(row)
        if r == 0:
            logger.info("variants at P/(T+P)=%.2f: pass_kv %.3f s, pass_q %.3f s", rate, row["pass_kv_s"], row["pass_q_s"])
    return rows


def rank_main(rank: int, world: int, port: int, ckpt: str, a: argparse.Namespace, out: Any) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s cp{world}-rank{rank} %(message)s")
    torch.set_num_threads(1)  # one thread per rank
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    timeout = datetime.timedelta(seconds=a.timeout)
    store = dist.TCPStore(HOST, port, world, rank == 0, timeout=timeout)
    ring = Ring(dist.ProcessGroupGloo(store, rank, world, timeout), rank, world)
    model, c = load_model(ckpt, "float32")
    forward_shard(model, ring, torch.arange(4 * world * BLOCK) % c.vocab_size, "pass_kv")  # warm-up
    for n in a.lengths:
        row = prefill(model, ring, n)
        logger.info("%d tokens: %.2f s", n, row["time_s"])
        if rank == 0:
            out.put(("prefill", row))
    if world == 2:
        measured = measure_link(ring, c.num_heads, c.num_kv_heads, c.head_dim)
        if rank == 0:
            out.put(("link", measured))
        rows = variant_sweep(ring, c, a.context, a.hit_rates, a.repeats, LinkModel(**measured))
        if rank == 0:
            out.put(("variants", rows))


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:  # the benchmark died without stopping us: don't linger
        time.sleep(1)
    os._exit(1)


# ---- the driver -----------------------------------------------------------------------------
def run_group(world: int, ckpt: str, a: argparse.Namespace, deadline: float, results: dict[str, Any]) -> None:
    q = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(rank_main, args=(world, free_port(HOST), ckpt, a, q), nprocs=world, join=False, start_method="spawn")

    def drain() -> None:  # rank 0 reports as it goes, so a run cut short keeps what it finished
        while not q.empty():
            kind, value = q.get()
            if kind == "prefill":
                results["prefill"].append(value)
            else:
                results[kind] = value

    try:
        while not ctx.join(timeout=1):
            drain()
            if time.monotonic() > deadline:
                raise TimeoutError(f"time limit reached during CP={world} (--timeout {a.timeout:g} s)")
    finally:
        for p in ctx.processes:  # only our own children, by their handles
            if p.is_alive():
                p.kill()
            p.join()
        drain()


def print_report(a: argparse.Namespace, results: dict[str, Any]) -> None:
    print("\nprefill: KV is NOT pushed (no decode worker); time = model forward over the shards, barrier to barrier")
    head = f"{'tokens':>7} {'CP':>3} {'variant':>8} {'time s':>8} {'tok/s':>7} {'T1/(N*TN)':>10} {'peak +MiB per rank':>20} {'logits vs CP=1':>15}"
    print(head + "\n" + "-" * len(head))
    base = {r["tokens"]: r for r in results["prefill"] if r["cp"] == 1}
    for r in sorted(results["prefill"], key=lambda r: (r["tokens"], r["cp"])):
        one = base.get(r["tokens"])
        eff = f"{one['time_s'] / (r['cp'] * r['time_s']):.2f}" if one else "-"
        r["efficiency"] = float(eff) if one else None
        diff = "-"
        if one and r["cp"] > 1 and "logits" in r and "logits" in one:
            diff = f"max|d| {(torch.tensor(r['logits']) - torch.tensor(one['logits'])).abs().max().item():.1e}"
        mem = " / ".join(f"{b / 2**20:.0f}" for b in r["peak_increase_bytes"])
        print(f"{r['tokens']:>7} {r['cp']:>3} {r['variant']:>8} {r['time_s']:>8.2f} {r['tokens'] / r['time_s']:>7.0f} {eff:>10} {mem:>20} {diff:>15}")
    print("peak +MiB: VmHWM during the forward minus RSS after the model loaded (reset before each length), per rank.")
    if "link" in results:
        link, d = results["link"], LinkModel()
        print(f"\npass-KV vs pass-Q: CP=2, one layer's ring_attention, total context {a.context} tokens "
              f"(H={MODEL['num_heads']}, KH={MODEL['num_kv_heads']}, float32), best of {a.repeats}")
        print(f"LinkModel measured: gloo send {link['bandwidth'] / 1e9:.2f} GB/s, attend_block {link['flops'] / 1e9:.1f} GFLOP/s; "
              f"default: {d.bandwidth / 1e9:.2f} GB/s, {d.flops / 1e9:.0f} GFLOP/s")
    if "variants" in results:
        head = f"{'P/(T+P)':>8} {'T':>6} {'P':>6} {'pass_kv s':>10} {'pass_q s':>9} {'faster':>8} {'choose(default)':>16} {'choose(measured)':>17}"
        print(head + "\n" + "-" * len(head))
        for r in results["variants"]:
            fast = "pass_kv" if r["pass_kv_s"] <= r["pass_q_s"] else "pass_q"
            print(f"{r['hit_rate']:>8.2f} {r['new']:>6} {r['cached']:>6} {r['pass_kv_s']:>10.3f} {r['pass_q_s']:>9.3f} "
                  f"{fast:>8} {r['choose_default']:>16} {r['choose_measured']:>17}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cp_scaling", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[16384, 32768], help="prompt lengths, comma-separated (default 16384,32768)")
    p.add_argument("--context", type=int, default=16384, help="total context of the variant sweep (default 16384)")
    p.add_argument("--hit-rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.5, 0.8, 0.95])
    p.add_argument("--repeats", type=int, default=1, help="variant sweep: best of this many (default 1)")
    p.add_argument("--timeout", type=float, default=3600, help="limit for the whole run, in seconds (default 3600)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if min(a.lengths) < 4 * BLOCK or a.context < 4 * BLOCK or not all(0 <= r < 1 for r in a.hit_rates):
        p.error(f"lengths and --context must be >= {4 * BLOCK}; hit rates in [0, 1)")
    return a


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    cli = ["python", *(["-m", "benchmarks.cp_scaling"] if __package__ else [sys.argv[0]]), *(sys.argv[1:] if argv is None else argv)]
    a = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _stop)
    deadline, start = time.monotonic() + a.timeout, time.monotonic()
    results: dict[str, Any] = {"prefill": []}
    error = None
    with tempfile.TemporaryDirectory(prefix="cp-scaling-") as ckpt:
        spec = TinySpec(**MODEL, max_position_embeddings=max(32768, *a.lengths, a.context))
        write_tiny_checkpoint(ckpt, spec)
        try:
            for world in (1, 2):
                run_group(world, ckpt, a, deadline, results)
        except (TimeoutError, mp.ProcessRaisedException, mp.ProcessExitedException, KeyboardInterrupt) as e:
            error = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            logger.error("stopped early: %s", error)
    print(f"\n$ {shlex.join(cli)}\ntorch {torch.__version__}, {os.cpu_count()} CPUs, 1 thread per rank, gloo on {HOST}; "
          f"model: {MODEL}, float32, block {BLOCK}, MLP chunk {MLP_CHUNK}; {time.monotonic() - start:.0f} s in all")
    print_report(a, results)
    if error:
        print(f"\nINCOMPLETE: {error}")
    if a.json:
        for r in results["prefill"]:
            r.pop("logits", None)
        Path(a.json).write_text(json.dumps({"cli": cli, "model": MODEL, **vars(a), **results, "error": error}, indent=2, default=str) + "\n")
        print(f"results written to {a.json}")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
