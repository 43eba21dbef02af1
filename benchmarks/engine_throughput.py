"""Offline generation throughput: this engine's `LLM.generate` against Hugging Face
`transformers` `generate` and, given a Python that has it (`--vllm-python`), vLLM's
`LLM.generate`, on the same random-weight Llama-shaped model and the same prompts, in one run.

Scenarios (greedy, EOS ignored, random prompt token ids from a fixed seed):
  * 1 request:   one prompt, one output length;
  * N requests:  N prompts of mixed lengths with mixed output lengths, all submitted at once.
    The engine batches them continuously; Hugging Face gets one left-padded batch (attention
    mask, pad token set) and generates the longest `max_new_tokens` for every row.
`--workload peers` is instead the workload of ../shared/peers/vllm_cpu_bench.py: 32 prompts of
16-512 tokens (Python's `random`, seed 0) x 64 output tokens after a warm-up on the first two,
then the first prompt alone (which both engines then find in their prefix caches); repeat r > 0
draws its prompts with seed r.

vLLM runs in its own process (`benchmarks/vllm_runner.py` under the given Python: it pins its
own torch, so it lives in its own virtual environment) and is driven repeat by repeat between
the other two, so a slow spell of the machine hits all three. vLLM-CPU (0.32) reserves one core
for its front end and runs the model on one OpenMP thread bound to the rest (on 2 cores: 1
thread); this engine and transformers use torch's threads (`--threads`; default: every core).
`--threads 1` compares at vLLM's thread count. With 2 threads on 2 cores, any other process on
the machine stalls every parallel region (each waits for its slowest thread), so runs while the
machine is busy vary several-fold: compare repeats, and the load averages printed.

Throughput is *useful* output tokens per second of wall time (prefill included): only the
tokens each request asked for count, for both systems, so the rows Hugging Face keeps decoding
past their own length are work it does but gets no credit for.

    python -m benchmarks.engine_throughput --preset small          # 19M parameters: ~30 s on 2 CPU cores
    python -m benchmarks.engine_throughput                         # 125M (75M without embeddings): ~3 min
    python -m benchmarks.engine_throughput --device cuda --dtype bfloat16 --preset 1b --json out.json
    python -m benchmarks.engine_throughput --model-dir /tmp/bench-model --workload peers --linear-kernel onednn \
        --vllm-python /tmp/vllm-cpu-venv/bin/python --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from splitserve.engine import LLM, SamplingParams
from splitserve.engine.tiny_checkpoint import TinySpec, write_tiny_checkpoint

logger = logging.getLogger("benchmarks.engine_throughput")

PRESETS: dict[str, TinySpec] = {
    "small": TinySpec(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=32000),
    "100m": TinySpec(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4, vocab_size=32000),
    "1b": TinySpec(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, vocab_size=32000),
}
SHAPE_FLAGS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")
PAD_ID = 0  # any id: padded positions are masked out
PEERS_OUTPUT = 64  # ../shared/peers: every request generates 64 tokens


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def useful_tokens(self) -> int:
        return sum(self.max_tokens)


@dataclass
class Run:
    seconds: float
    outputs: list[list[int]]  # what each request asked for, truncated to its max_tokens
    computed_tokens: int  # output tokens generated, including those nobody asked for
    cached_prompt_tokens: int = 0  # prefix-cache hits (stays 0: every prompt is distinct)


# ---- set-up ------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="100m", help="model shape (default: 100m)")
    for name in SHAPE_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, help="override the preset's " + name)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--model-dir", help="checkpoint folder: reused if it has a config.json, else written there; kept")
    p.add_argument("--workload", choices=("mixed", "peers"), default="mixed", help="peers: ../shared/peers' workload (see above)")
    p.add_argument("--num-requests", type=int, default=32, help="requests in the batched scenario")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 512), metavar=("MIN", "MAX"), help="batched prompt lengths")
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"), help="batched output lengths (peers: 64 64)")
    p.add_argument("--single-prompt-len", type=int, default=128, help="prompt length of the 1-request scenario (mixed)")
    p.add_argument("--single-output-len", type=int, default=128, help="output length of the 1-request scenario (mixed)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="engine token budget per step")
    p.add_argument("--block-size", type=int, default=16, help="engine KV block size")
    p.add_argument("--linear-kernel", choices=("torch", "onednn"), default="torch", help="the engine's CPU GEMMs (engine/cpu_linear.py)")
    p.add_argument("--attention-backend", default="auto", help="the engine's attention backend (engine/attention_cuda.py)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU), for the engine and transformers")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per scenario and system (new prompts each); best counts")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts")
    p.add_argument("--vllm-python", type=Path, help="a Python with vLLM installed (e.g. /tmp/vllm-cpu-venv/bin/python): compare with it too")
    p.add_argument("--vllm-timeout", type=float, default=900, help="seconds vLLM may take to start or to answer one batch")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs, one more run of each scenario of ours under torch.profiler: where its time goes")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.repeats < 1 or args.num_requests < 1:
        p.error("--repeats and --num-requests must be >= 1")
    if args.workload == "peers":
        args.output_len = (PEERS_OUTPUT, PEERS_OUTPUT)
    for lo, hi, flag in (*args.prompt_len, "--prompt-len"), (*args.output_len, "--output-len"):
        if not 0 < lo <= hi:
            p.error(f"{flag}: need 0 < MIN <= MAX, got {lo} {hi}")
    if args.vllm_python is not None and not args.vllm_python.is_file():
        p.error(f"--vllm-python: no such file {args.vllm_python}")
    return args


def model_spec(args: argparse.Namespace, max_len: int) -> TinySpec:
    overrides = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None}
    positions = max(2048, -(-max_len // 1024) * 1024)
    return replace(PRESETS[args.preset], **overrides, max_position_embeddings=positions, dtype=args.dtype, seed=args.seed)


def prepare_checkpoint(args: argparse.Namespace, max_len: int) -> tuple[Path, bool]:
    """The checkpoint folder, and whether it is a temporary one to delete at exit."""
    if args.model_dir and (Path(args.model_dir) / "config.json").is_file():
        logger.info("using the existing checkpoint in %s (shape flags ignored)", args.model_dir)
        return Path(args.model_dir), False
    path = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp(prefix="engine-bench-"))
    spec = model_spec(args, max_len)
    logger.info("writing a random %s checkpoint to %s", spec, path)
    write_tiny_checkpoint(path, spec)
    return path, args.model_dir is None


def make_workloads(args: argparse.Namespace, vocab_size: int) -> tuple[Workload, list[list[Workload]]]:
    """(warm-up, for each scenario one workload per repeat). Repeats keep the lengths and draw
    new token ids: every prompt is distinct, so nothing hits the prefix cache another left."""
    if args.workload == "peers":
        return peers_workloads(args, vocab_size)
    rng = random.Random(args.seed)

    def draw(name: str, prompt_lens: list[int], max_tokens: list[int]) -> Workload:
        return Workload(name, [[rng.randrange(2, vocab_size) for _ in range(n)] for n in prompt_lens], max_tokens)

    n = args.num_requests
    lens = [rng.randint(*args.prompt_len) for _ in range(n)]
    outs = [rng.randint(*args.output_len) for _ in range(n)]
    shapes = [("1 request", [args.single_prompt_len], [args.single_output_len]), (f"{n} request{'s' * (n > 1)}", lens, outs)]
    warm = draw("warm-up", [32, 48, 64, 80], [8, 12, 16, 16])
    return warm, [[draw(*shape) for _ in range(args.repeats)] for shape in shapes]


def peers_workloads(args: argparse.Namespace, vocab_size: int) -> tuple[Workload, list[list[Workload]]]:
    """../shared/peers/vllm_cpu_bench.py's prompts (seed r for repeat r): the batch first,
    then its first prompt alone, after a warm-up on the first two prompts of repeat 0."""
    n, top = args.num_requests, min(8000, vocab_size)
    lo, hi = args.prompt_len

    def prompts(seed: int) -> list[list[int]]:
        rng = random.Random(seed)  # the same draws as random.seed(seed) and the module functions
        return [[rng.randrange(3, top) for _ in range(rng.randint(lo, hi))] for _ in range(n)]

    batches = [prompts(r) for r in range(args.repeats)]
    warm = Workload("warm-up", batches[0][:2], [PEERS_OUTPUT] * 2)
    many = [Workload(f"{n} requests", b, [PEERS_OUTPUT] * n) for b in batches]
    one = [Workload("1 request", b[:1], [PEERS_OUTPUT]) for b in batches]
    return warm, [many, one]


def max_sequence_len(args: argparse.Namespace) -> int:
    return max(args.single_prompt_len + args.single_output_len, args.prompt_len[1] + args.output_len[1], 96)


def kv_blocks_needed(workloads: list[Workload], block_size: int) -> int:
    """Enough KV blocks for the largest scenario at once, so neither system preempts or
    recomputes (Hugging Face's cache simply grows)."""
    return max(sum(-(-(len(p) + m) // block_size) for p, m in zip(w.prompts, w.max_tokens)) for w in workloads)


# ---- the systems ---------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def run_ours(llm: LLM, w: Workload, device: str) -> Run:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in w.max_tokens]
    sync(device)
    start = time.perf_counter()
    outs = llm.generate(w.prompts, params)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = [list(o.token_ids) for o in outs]
    cached = sum(o.num_cached_tokens for o in outs)
    return Run(seconds, tokens, sum(len(t) for t in tokens), cached)


def profile_ours(llm: LLM, w: Workload, device: str, top: int = 10) -> dict[str, Any]:
    """One run of `w` under torch.profiler: the ops that took the most time on the calling
    thread (self time: an op's own, not its children's; a parallel op's wall time), and what
    was left outside any op (Python: scheduling, step metadata, sampling glue)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        seconds = run_ours(llm, w, device).seconds
    ops = sorted(((e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()), key=lambda r: -r[1])
    rest = ops[top:]
    named = [*ops[:top], ("(other ops)", sum(t for _, t, _ in rest), sum(n for _, _, n in rest))]
    named.append(("(outside any op: Python)", seconds - sum(t for _, t, _ in ops), 0))
    rows = [{"op": name, "seconds": t, "calls": n, "share": t / seconds} for name, t, n in named]
    return {"scenario": w.name, "seconds": seconds, "rows": rows}


def print_profile(p: dict[str, Any]) -> None:
    print(f"\nprofile of ours, {p['scenario']}: {p['seconds']:.2f} s under the profiler (slower than unprofiled)")
    print(f"{'op':<60} {'self s':>8} {'share':>7} {'calls':>7}")
    for r in p["rows"]:
        print(f"{r['op'][:60]:<60} {r['seconds']:>8.3f} {r['share']:>6.1%} {r['calls'] or '':>7}")


def load_hf(model_dir: Path, dtype: str, device: str) -> torch.nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    transformers.utils.logging.disable_progress_bar()
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **{dtype_key: getattr(torch, dtype)}).to(device).eval()
    # No EOS at all: generate() fills unset values from the model's generation config, so a
    # None passed to generate() would bring the checkpoint's EOS back.
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    return model


def run_hf(model: torch.nn.Module, w: Workload, device: str) -> Run:
    """One left-padded batch; every row decodes to the longest `max_tokens`."""
    width = max(len(p) for p in w.prompts)
    ids = torch.full((len(w.prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(w.prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    new = max(w.max_tokens)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, do_sample=False)
    sync(device)
    seconds = time.perf_counter() - start
    generated = out[:, width:].tolist()  # [B, new]
    if any(len(g) != new for g in generated):
        raise RuntimeError(f"transformers stopped early: {[len(g) for g in generated]} tokens, expected {new}")
    return Run(seconds, [g[:m] for g, m in zip(generated, w.max_tokens)], len(w.prompts) * new)


class VllmProcess:
    """vLLM's `LLM` in `benchmarks/vllm_runner.py` under another Python (see that file)."""

    def __init__(self, python: Path, model_dir: Path, args: argparse.Namespace, max_len: int) -> None:
        runner = Path(__file__).with_name("vllm_runner.py")
        self.timeout = args.vllm_timeout
        # cwd outside the repository: its folders must not shadow installed packages
        self.proc = subprocess.Popen([str(python), str(runner)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
        spec = {"model": str(model_dir), "dtype": args.dtype, "max_model_len": max_len, "seed": args.seed, "enforce_eager": True}
        # as ../shared/peers does: sizes vLLM-CPU's KV cache; on a GPU it leaves room for this
        # engine and transformers, which hold the same device
        spec["gpu_memory_utilization"] = 0.3
        self.version = self._ask(spec)["version"]

    def _ask(self, obj: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        ready = select_readable(self.proc.stdout, self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"vLLM runner gave no answer (exit status {self.proc.poll()}; its log is on stderr above)")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"vLLM runner: {reply.get('error')}")
        return reply

    def run(self, w: Workload) -> Run:
        reply = self._ask({"cmd": "generate", "prompts": w.prompts, "max_tokens": w.max_tokens})
        tokens = reply["outputs"]
        return Run(reply["seconds"], tokens, sum(len(t) for t in tokens))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def select_readable(stream: Any, timeout: float) -> bool:
    import select

    return bool(select.select([stream], [], [], timeout)[0])


# ---- report ------------------------------------------------------------------------------
def scenario_result(w: Workload, runs: list[dict[str, Run]]) -> dict[str, Any]:
    """Best time of each system over the repeats (the machine only ever adds noise)."""
    lens = [len(p) for p in w.prompts]

    def side(name: str) -> dict[str, Any]:
        seconds = [r[name].seconds for r in runs]
        out = {"seconds": min(seconds), "tokens_per_s": w.useful_tokens / min(seconds), "all_seconds": seconds,
               "computed_tokens": runs[0][name].computed_tokens}
        if name == "ours":
            out["cached_prompt_tokens"] = sum(r["ours"].cached_prompt_tokens for r in runs)
        return out

    ours, hf = side("ours"), side("hf")
    result = {
        "scenario": w.name,
        "requests": len(w.prompts),
        "prompt_tokens": sum(lens),
        "prompt_len_range": [min(lens), max(lens)],
        "output_len_range": [min(w.max_tokens), max(w.max_tokens)],
        "useful_output_tokens": w.useful_tokens,
        "ours": ours,
        "hf": hf,
        "ratio_ours_over_hf": ours["tokens_per_s"] / hf["tokens_per_s"],
        "identical_requests": sum(a == b for r in runs for a, b in zip(r["ours"].outputs, r["hf"].outputs)),
        "compared_requests": len(runs) * len(w.prompts),
    }
    if "vllm" in runs[0]:
        result["vllm"] = side("vllm")
        result["ratio_ours_over_vllm"] = ours["tokens_per_s"] / result["vllm"]["tokens_per_s"]
        result["identical_requests_vllm"] = sum(a == b for r in runs for a, b in zip(r["ours"].outputs, r["vllm"].outputs))
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    vllm = "vllm" in results[0]
    head = (
        f"{'scenario':<13} {'prompt len':>10} {'output len':>10} {'useful tok':>10} "
        f"{'ours s':>8} {'ours tok/s':>10} {'HF s':>8} {'HF tok/s':>9} {'ours/HF':>8} {'same tokens':>11}"
    )
    if vllm:
        head += f" {'vLLM s':>8} {'vLLM tok/s':>10} {'ours/vLLM':>9} {'same as vLLM':>12}"
    print(head)
    print("-" * len(head))
    for r in results:
        pl, ol = "{}..{}".format(*r["prompt_len_range"]), "{}..{}".format(*r["output_len_range"])
        same = f"{r['identical_requests']}/{r['compared_requests']}"
        line = (f"{r['scenario']:<13} {pl:>10} {ol:>10} {r['useful_output_tokens']:>10} "
                f"{r['ours']['seconds']:>8.2f} {r['ours']['tokens_per_s']:>10.1f} {r['hf']['seconds']:>8.2f} "
                f"{r['hf']['tokens_per_s']:>9.1f} {r['ratio_ours_over_hf']:>7.2f}x {same:>11}")
        if vllm:
            same_v = f"{r['identical_requests_vllm']}/{r['compared_requests']}"
            line += f" {r['vllm']['seconds']:>8.2f} {r['vllm']['tokens_per_s']:>10.1f} {r['ratio_ours_over_vllm']:>8.2f}x {same_v:>12}"
        print(line)
    print("tok/s: useful output tokens (only those each request asked for, for both systems) per wall second")
    print("of the whole generate call, prefill included; best of --repeats. HF decodes every row of its padded")
    print("batch to the longest max_tokens, so it computed " +
          ", ".join(f"{r['hf']['computed_tokens']} ({r['scenario']})" for r in results) + " output tokens.")
    print("same tokens: requests whose greedy outputs are identical in both systems" + (" (ours vs HF; ours vs vLLM)." if vllm else "."))


def check_first_request(ours: Run, hf: Run, dtype: str) -> bool:
    """At one request, greedy decoding of the same weights must give the same tokens."""
    a, b = ours.outputs[0], hf.outputs[0]
    if a == b:
        print(f"check: the first request's {len(a)} greedy tokens match Hugging Face's.")
        return True
    at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    why = "near-ties can flip at reduced precision" if dtype != "float32" else "float32 should match: a bug?"
    print(f"WARNING: greedy tokens differ from Hugging Face at output position {at} of {len(a)} ({why}).")
    return False


def environment(args: argparse.Namespace, params: int, load_at_start: float, vllm_version: str | None) -> dict[str, Any]:
    import transformers

    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu
    return {
        "device": args.device, "device_name": device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "vllm": vllm_version, "parameters": params,
        # other work on the machine skews both systems' times, and not equally
        "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
    }


# ---- main --------------------------------------------------------------------------------
def benchmark(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    load_at_start = os.getloadavg()[0]
    config = json.loads((model_dir / "config.json").read_text())
    warm, scenarios = make_workloads(args, config["vocab_size"])
    blocks = kv_blocks_needed([warm, *(s[0] for s in scenarios)], args.block_size) + args.num_requests
    max_len = min(config.get("max_position_embeddings", 4096), 4096)
    llm = LLM(str(model_dir), dtype=args.dtype, device=args.device, block_size=args.block_size, num_kv_blocks=blocks,
              max_num_seqs=max(args.num_requests, 4), max_num_batched_tokens=args.max_num_batched_tokens,
              linear_kernel=args.linear_kernel, attention_backend=args.attention_backend)
    hf = load_hf(model_dir, args.dtype, args.device)
    vllm = VllmProcess(args.vllm_python, model_dir, args, max_len) if args.vllm_python else None
    try:
        params = sum(p.numel() for p in hf.parameters())
        logger.info("model: %.1fM parameters, %s on %s; warming up", params / 1e6, args.dtype, args.device)
        systems: dict[str, Any] = {"ours": lambda w: run_ours(llm, w, args.device), "hf": lambda w: run_hf(hf, w, args.device)}
        if vllm is not None:
            systems["vllm"] = vllm.run
        for run in systems.values():
            run(warm)
        results, first_ok = [], True
        # repeat by repeat, each system in turn, so a slow spell of the machine hits them all
        per_scenario: list[list[dict[str, Run]]] = [[] for _ in scenarios]
        for i in range(args.repeats):
            for k, repeats in enumerate(scenarios):
                w = repeats[i]
                runs = {}
                for name, run in systems.items():
                    logger.info("%s (%d/%d): %s", w.name, i + 1, args.repeats, name)
                    runs[name] = run(w)
                per_scenario[k].append(runs)
        for k, repeats in enumerate(scenarios):
            if repeats[0].name == "1 request":
                first_ok = check_first_request(per_scenario[k][0]["ours"], per_scenario[k][0]["hf"], args.dtype)
            results.append(scenario_result(repeats[0], per_scenario[k]))
        version = vllm.version if vllm is not None else None
    finally:
        if vllm is not None:
            vllm.close()
    profiles = [profile_ours(llm, repeats[0], args.device) for repeats in scenarios] if args.profile else []
    return {"environment": environment(args, params, load_at_start, version), "first_request_matches": first_ok, "scenarios": results,
            "profiles": profiles}


def main(argv: list[str] | None = None) -> int:
    from_cli = argv is None
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    cli = [Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]] if from_cli else ["python", "-m", "benchmarks.engine_throughput", *argv]
    command = shlex.join(cli)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` removes a temporary checkpoint
    model_dir, temporary = prepare_checkpoint(args, max_sequence_len(args))
    try:
        report = benchmark(args, model_dir)
    finally:
        if temporary:
            shutil.rmtree(model_dir, ignore_errors=True)
    report = {"command": command, "preset": args.preset, "args": _jsonable(vars(args)), **report}
    env = report["environment"]
    print(f"\n$ {command}")
    print(f"model: {env['parameters'] / 1e6:.1f}M parameters (Llama-shaped, random weights), {env['dtype']}, "
          f"{env['device']} ({env['device_name']}, {env['threads']} threads), torch {env['torch']}, "
          f"transformers {env['transformers']}" + (f", vLLM {env['vllm']}" if env["vllm"] else "") +
          f"; engine linear kernel {args.linear_kernel}; load average {env['load_average_1min']['start']:.1f} at start, "
          f"{env['load_average_1min']['end']:.1f} at end")
    print_table(report["scenarios"])
    for p in report["profiles"]:
        print_profile(p)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


if __name__ == "__main__":
    sys.exit(main())
