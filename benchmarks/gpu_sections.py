"""The GPU suite's sections that are more than another benchmark's command line (see
`benchmarks/gpu_suite.py`): `parity` and `cp`. Each runs in a child process of the suite and
returns one JSON-able dict; `{"skipped": why}` when the machine cannot run it. Needs CUDA."""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import torch


def run(section: str, a: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    return {"parity": parity, "cp": cp_prefill}[section](a)


# ---- parity: the disaggregated path over NCCL against one engine -----------------------------
def parity(a: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from benchmarks.gpu_suite import PARITY_PROMPTS, PARITY_TOKENS
    from benchmarks.procs import Child
    from splitserve.engine import LLM, SamplingParams
    from splitserve.proto import worker_pb2, worker_pb2_grpc

    two = torch.cuda.device_count() >= 2
    transport = "torch" if two else "grpc"  # NCCL needs a device per rank
    decode_device = "cuda:1" if two else "cuda:0"
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 8000) for _ in range(rng.randint(16, 512))] for _ in range(PARITY_PROMPTS)]
    common = ["--model", str(a.model_dir), "--dtype", "bfloat16", "--kv-cache-memory", str(4 << 30)]
    workers = [Child("decode", ["splitserve.decode_worker", *common, "--device", decode_device, "--transports", transport,
                                "--default-transport", transport], env={"OMP_NUM_THREADS": "4"}),
               Child("prefill", ["splitserve.prefill_worker", *common, "--device", "cuda:0"], env={"OMP_NUM_THREADS": "4"})]
    try:
        decode_addr, prefill_addr = (w.wait_ready(240)["address"] for w in workers)
        with grpc.insecure_channel(decode_addr) as dch, grpc.insecure_channel(prefill_addr) as pch:
            decode, prefill = worker_pb2_grpc.DecodeWorkerStub(dch), worker_pb2_grpc.PrefillWorkerStub(pch)
            split = [_disaggregated(decode, prefill, f"parity-{i}", p, PARITY_TOKENS, worker_pb2) for i, p in enumerate(prompts)]
    finally:
        for w in workers:
            w.stop()
    llm = LLM(str(a.model_dir), dtype="bfloat16", device="cuda:0")
    # one request at a time, as the split path ran them: bfloat16 results depend on the batch's shapes
    greedy = SamplingParams(temperature=0, max_tokens=PARITY_TOKENS, ignore_eos=True)
    alone = [list(llm.generate([p], greedy)[0].token_ids) for p in prompts]
    identical = sum(s == r for s, r in zip(split, alone))
    first_diff = [next((j for j, (x, y) in enumerate(zip(s, r)) if x != y), None) for s, r in zip(split, alone)]
    result = {"transport": "torch (NCCL)" if two else "grpc (one GPU: NCCL needs two)", "requests": len(prompts), "tokens": PARITY_TOKENS,
              "identical": identical, "first_difference_at": first_diff, "prompt_lens": [len(p) for p in prompts]}
    if identical < len(prompts):
        result["failed"] = f"{len(prompts) - identical}/{len(prompts)} requests differ from one engine (first differences at {first_diff})"
    return result


def _disaggregated(decode, prefill, rid: str, prompt: list[int], tokens: int, pb) -> list[int]:
    """One request as the router runs it: reserve on D, open D's stream, prefill on P."""
    params = pb.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    desc = decode.Reserve(pb.ReserveRequest(request_id=rid, prompt_token_ids=prompt, params=params), timeout=120)
    stream = decode.Decode(pb.DecodeRequest(request_id=rid), timeout=300)
    first = prefill.Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, params=params, descriptor=desc), timeout=300)
    out: list[int] = []
    for chunk in stream:
        out.extend(chunk.token_ids)
        if chunk.finished:
            break
    if out and out[0] != first.first_token:
        raise RuntimeError(f"{rid}: the decode stream starts with {out[0]}, the prefill sampled {first.first_token}")
    return out


# ---- cp: context-parallel prefill at CP = 1 --------------------------------------------------
def cp_prefill(a: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist

    from benchmarks.gpu_suite import peak_tflops, prefill_flops
    from splitserve.cluster.net import free_port
    from splitserve.engine.loader import load_model
    from splitserve.prefill_worker.ring_attention import Ring, positions_of, ring_attention, shard_ranges

    def forward(prompt: torch.Tensor) -> torch.Tensor:
        """CPRank._forward on a ring of one, without the KV push: the last position's logits."""
        m, n = model.model, len(prompt)
        pos = positions_of(shard_ranges(n, 1, 16)[0]).to(device)
        h = m.embed_tokens(prompt[pos])  # [T, hidden]
        rope = m.rotary_emb(pos, h.dtype)
        for layer in m.layers:
            q, k, v = layer.self_attn.project(layer.input_layernorm(h), rope)
            out, _ = ring_attention(ring, q, k, v, pos, pos, c.head_dim ** -0.5, "pass_kv")  # [T, H, D] float32
            h = h + layer.self_attn.o_proj(out.to(h.dtype).flatten(1))
            h = h + layer.mlp(layer.post_attention_layernorm(h), 2048)  # CPRank's MLP chunk
        last = int((pos == n - 1).nonzero()[0, 0])
        return model.lm_head(m.norm(h[last : last + 1])).float()

    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True)
    ring = Ring(dist.ProcessGroupNCCL(store, 0, 1), 0, 1, device)  # a ring of one: what a CP = 1 group runs
    model, c = load_model(a.model_dir, "bfloat16", str(device))
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name, a.peak_tflops)
    with torch.inference_mode():
        forward(torch.arange(4096, device=device) % c.vocab_size)  # warm-up
    runs, not_run = [], ""
    began = time.monotonic()
    for n in [a.cp_tokens, *([a.cp_long_tokens] if a.cp_long_tokens else [])]:
        if runs:
            # attention grows with n^2: go on only if the estimate leaves room (the parent kills us anyway)
            estimate = runs[-1]["seconds"] * (n / runs[-1]["tokens"]) ** 2
            if estimate > a.budget_s - (time.monotonic() - began) - 30:  # 30 s: loading, warm-up, exit
                not_run = f"{n} tokens skipped: estimated {estimate:.0f} s"
                break
        prompt = torch.randint(0, c.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).to(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = forward(prompt)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        flops = prefill_flops(n, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size)
        tflops = flops / seconds / 1e12
        runs.append({"tokens": n, "seconds": seconds, "tokens_per_s": n / seconds, "model_tflop": flops / 1e12, "tflops": tflops,
                     "peak_tflops": peak, "fraction_of_peak": tflops / peak if peak else None,
                     "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30, "finite_logits": bool(torch.isfinite(logits).all())})
        del prompt, logits
    result = {"device": name, "model_dir": str(Path(a.model_dir)), "runs": runs, "not_run": not_run,  # "skipped" would mean the whole section
              "note": "ring attention computes its scores in float32 (exact log-sum-exp merging), the linear layers in bfloat16"}
    bad = [r["tokens"] for r in runs if not r["finite_logits"]]
    if bad:
        result["failed"] = f"non-finite logits after prefilling {bad} tokens"
    return result
