"""Goodput: the highest request rate at which at least 90 % of requests meet both their TTFT
and their TPOT SLO (DistServe's measure), for colocated serving and for disaggregated serving
under each routing policy, on the same trace and the same CPU cores.

Setup, on 127.0.0.1, stopped at exit: an embedded redis-server, a random-weight Llama (hidden
256, 4 layers, 16k context), and per configuration a fresh cluster on the same cores:
    colocated                 2N workers that each prefill and decode, N on each half of the CPUs,
                              least loaded first (+workload_aware: by cached prefix and load too,
                              so the comparison with disaggregation is not one of cache awareness)
    disaggregated x policy    N prefill workers on the first half of the CPUs, N decode workers on
                              the second; round_robin, least_loaded, workload_aware
    workload_aware+admission  the same, refusing at once what its prediction says would miss
                              the TTFT SLO (refused requests count as missed)
Each rate runs on a fresh cluster, warmed with one request per system prompt and document, so
every run starts from the same state and the order of the sweep does not matter.
The trace (seeded) mixes short chats under 4 tenants' shared system prompts, with light or
heavy outputs (a tenant's outputs are heavy or light), and long documents of 4-8k tokens, some
of them asked about more than once; requests arrive as a Poisson process. Each configuration
replays it at each rate of the sweep.

Printed: per configuration and rate the SLO attainment, TTFT and TPOT p50/p99 and refusals;
each configuration's goodput and its ratio to round_robin's and to colocated's; the output-
length predictor's accuracy on the trace (heavy/light bucket accuracy, Kendall's tau-b) and
the TTFT predictor's median error. The curves go to JSON and to a PNG plot.

    python -m benchmarks.goodput                                   # ~20 minutes
    python -m benchmarks.goodput --rates 0.5,1,2 --requests 30 --out /tmp/goodput
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.procs import BenchCluster

CONFIGS = ("colocated", "colocated+workload_aware", "round_robin", "least_loaded", "workload_aware", "workload_aware+admission")


@dataclass(frozen=True)
class Request:
    at: float
    prompt: list[int]
    max_tokens: int
    kind: str  # "chat" | "document"


def make_trace(seed: int, n: int, rate: float, vocab: int) -> list[Request]:
    rng = random.Random(seed)
    systems = [[rng.randrange(3, vocab) for _ in range(500)] for _ in range(4)]
    heavy_tenant = [False, True, False, True]
    documents = [[rng.randrange(3, vocab) for _ in range(rng.randint(4000, 8000))] for _ in range(4)]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        if rng.random() < 0.8:
            tenant = rng.randrange(4)
            prompt = systems[tenant] + [rng.randrange(3, vocab) for _ in range(rng.randint(50, 150))]
            out_len = rng.randint(160, 256) if heavy_tenant[tenant] else rng.randint(16, 48)
            out.append(Request(t, prompt, out_len, "chat"))
        else:
            doc = documents[rng.randrange(len(documents))]
            out.append(Request(t, doc + [rng.randrange(3, vocab) for _ in range(30)], rng.randint(32, 64), "document"))
    return out


async def replay(address: str, trace: list[Request]) -> list[dict[str, Any]]:
    from splitserve.proto.client import AsyncClient, SplitserveError

    results: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    async with AsyncClient(address, timeout=900) as client:
        start = loop.time()

        async def one(r: Request) -> None:
            await asyncio.sleep(max(0.0, start + r.at - loop.time()))
            try:
                done = await client.generate(r.prompt, max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
            except SplitserveError as e:
                results.append({"ok": False, "status": e.status, "request": r})
                return
            t = done.timings
            tpot = (t["e2e"] - t["ttft"]) / max(1, len(done.token_ids) - 1)
            results.append({"ok": True, "ttft": t["ttft"], "tpot": tpot, "output": len(done.token_ids), "timings": t, "request": r})

        await asyncio.gather(*(one(r) for r in trace))
    return results


def cluster_for(config: str, model: Path, redis_url: str, tmp: Path, cpus: tuple[str, str], slo: dict, per_pool: int) -> BenchCluster:
    colocated = config.startswith("colocated")
    policy = "workload_aware" if "workload_aware" in config else "least_loaded" if colocated else config
    c = BenchCluster(model, redis_url, tmp, {"colocated": colocated, "router": {"policy": policy, "request_timeout_s": 900},
                                            "slo": {**slo, "admission": config.endswith("+admission")}})
    chunk = ["--max-prefill-chunk", "512"]
    roles = ("decode", "decode") if colocated else ("prefill", "decode")
    return c.start([(role, chunk, cpu) for role, cpu in zip(roles, cpus) for _ in range(per_pool)])


def warm_up(address: str, trace: list[Request]) -> None:
    """One request per distinct system prompt / document, one at a time."""
    seen, firsts = set(), []
    for r in trace:
        key = tuple(r.prompt[:500])
        if key not in seen:
            seen.add(key)
            firsts.append(Request(0.0, r.prompt, 4, r.kind))
    for r in firsts:
        asyncio.run(replay(address, [r]))


def summarize(results: list[dict[str, Any]], slo_ttft: float, slo_tpot: float) -> dict[str, Any]:
    ok = [r for r in results if r["ok"]]
    met = [r for r in ok if r["ttft"] <= slo_ttft and r["tpot"] <= slo_tpot]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {"requests": len(results), "attainment": len(met) / max(1, len(results)), "refused": sum(r.get("status") == "RESOURCE_EXHAUSTED" for r in results),
            "failed": sum(not r["ok"] and r.get("status") != "RESOURCE_EXHAUSTED" for r in results),
            "ttft_p50": pct([r["ttft"] for r in ok], 50), "ttft_p99": pct([r["ttft"] for r in ok], 99),
            "tpot_p50": pct([r["tpot"] for r in ok], 50), "tpot_p99": pct([r["tpot"] for r in ok], 99)}


def goodput(rows: dict[float, dict[str, Any]]) -> float:
    """The highest rate of the sweep at which >= 90 % met both SLOs (0 if none did)."""
    return max((rate for rate, s in rows.items() if s["attainment"] >= 0.9), default=0.0)


def kendall_tau_b(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    da, db = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
    num = (da * db).sum()
    return float(num / np.sqrt((da != 0).sum() * (db != 0).sum())) if (da != 0).any() and (db != 0).any() else float("nan")


def predictor_accuracy(results: list[dict[str, Any]], heavy_tokens: int = 256) -> dict[str, float]:
    ok = [r for r in results if r["ok"] and r["timings"]["predicted_output"]]
    if not ok:
        return {}
    pred = [r["timings"]["predicted_output"] for r in ok]
    actual = [r["output"] for r in ok]
    heavy = 160  # the trace's heavy outputs are 160-256 tokens, light ones 16-64
    ttft_err = [abs(r["timings"]["predicted_ttft"] - r["ttft"]) / r["ttft"] for r in ok if r["timings"]["predicted_ttft"] > 0]
    return {"bucket_accuracy": sum((p >= heavy) == (a >= heavy) for p, a in zip(pred, actual)) / len(ok),
            "kendall_tau_b": kendall_tau_b(pred, actual), "ttft_median_relative_error": float(np.median(ttft_err)) if ttft_err else float("nan")}


def plot(report: dict[str, Any], path: Path, slo: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config, rows in report["curves"].items():
        rates = sorted(float(r) for r in rows)
        ax.plot(rates, [rows[str(r)]["attainment"] * 100 for r in rates], marker="o", label=f"{config} (goodput {report['goodput'][config]:g}/s)")
    ax.axhline(90, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel(f"% meeting TTFT <= {slo['ttft_ms']:g} ms and TPOT <= {slo['tpot_ms']:g} ms")
    ax.set_ylim(0, 102)
    ax.set_title("SLO attainment on the same 2 CPU cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.goodput", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rates", default="0.25,0.5,1,1.5,2", help="requests per second")
    parser.add_argument("--requests", type=int, default=40, help="requests per rate (after the warm-up)")
    parser.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=150.0)
    parser.add_argument("--workers-per-pool", type=int, default=2, help="N: N prefill + N decode, or 2N colocated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="goodput_out", help="folder for goodput.json and goodput.png")
    args = parser.parse_args(argv)

    from splitserve.cluster.redis_server import EmbeddedRedis
    from splitserve.engine.tiny_checkpoint import TinySpec, write_tiny_checkpoint

    n = os.cpu_count() or 2
    cpus = (f"0-{max(0, n // 2 - 1)}", f"{n // 2}-{n - 1}") if n >= 2 else ("0", "0")
    slo = {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}
    spec = TinySpec(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=2048, max_position_embeddings=16384)
    rates = [float(r) for r in args.rates.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"slo": slo, "cpus": cpus, "curves": {}, "goodput": {}, "predictor": {}}
    print(f"SLOs: TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= {args.slo_tpot_ms:g} ms; {args.requests} requests per rate; "
          f"workers pinned to CPUs {cpus[0]} and {cpus[1]}")
    print(f"{'config':<26} {'rate':>5} {'attain':>7} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>7} {'refused':>8} {'failed':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_checkpoint(Path(tmp) / "model", spec)
        redis = EmbeddedRedis()
        try:
            for config in args.configs.split(","):
                rows, everything = {}, []
                for rate in rates:
                    cluster = cluster_for(config, model, redis.url, Path(tmp), cpus, slo, args.workers_per_pool)
                    try:
                        trace = make_trace(args.seed, args.requests, rate, spec.vocab_size)
                        warm_up(cluster.grpc(), trace)
                        results = asyncio.run(replay(cluster.grpc(), trace))
                    finally:
                        cluster.stop()
                    everything += results
                    s = rows[rate] = summarize(results, args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
                    print(f"{config:<26} {rate:>5g} {s['attainment'] * 100:>6.0f}% {s['ttft_p50'] * 1000:>9.0f} {s['ttft_p99'] * 1000:>8.0f} "
                          f"{s['tpot_p50'] * 1000:>9.1f} {s['tpot_p99'] * 1000:>7.1f} {s['refused']:>8} {s['failed']:>7}", flush=True)
                report["curves"][config] = {str(r): s for r, s in rows.items()}
                report["goodput"][config] = goodput(rows)
                if "workload_aware" in config:
                    report["predictor"][config] = predictor_accuracy(everything)
        finally:
            redis.stop()
    print()
    base_rr, base_col = report["goodput"].get("round_robin"), report["goodput"].get("colocated")
    for config, g in report["goodput"].items():
        ratios = [f"{g / b:.2f}x {name}" for name, b in (("round_robin", base_rr), ("colocated", base_col)) if b]
        print(f"goodput {config:<26} {g:>5g} req/s" + (f"  ({', '.join(ratios)})" if ratios else ""))
    for config, acc in report["predictor"].items():
        if acc:
            print(f"{config}: output length heavy/light accuracy {acc['bucket_accuracy']:.2f}, Kendall tau-b {acc['kendall_tau_b']:.2f}; "
                  f"TTFT prediction median error {acc['ttft_median_relative_error'] * 100:.0f} %")
    (out / "goodput.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "goodput.png", slo)
    print(f"curves: {out / 'goodput.json'}  plot: {out / 'goodput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
