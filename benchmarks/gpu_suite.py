"""Every GPU path in one run (`benchmarks/gpu_suite.sh`), within a time budget (default 8 minutes),
on a machine with CUDA and neither Ray nor Redis:

  kv_nccl  `benchmarks/kv_transfer.py --device cuda`: the torch transport over NCCL (cuda:0 ->
           cuda:1) against one raw NCCL send/recv of the same bytes. Needs two GPUs: NCCL refuses
           two ranks on one device.
  engine   `benchmarks/engine_throughput.py` in bfloat16 on a ~1B-parameter Llama-shaped random
           model against transformers on the same GPU (and vLLM, given --vllm-python).
  parity   greedy tokens of the disaggregated path against one engine: a prefill and a decode
           worker started directly (`python -m splitserve.{prefill,decode}_worker`, no Ray, no
           Redis), driven as the router drives them (Reserve -> Decode -> Prefill). KV over NCCL
           (torch transport, workers on cuda:0 and cuda:1); on one GPU over gRPC, and it says so.
  cp       context-parallel prefill of --cp-tokens (131,072) tokens at CP = 1: the ring-attention
           forward the CP ranks run, on one GPU; time, tokens/s, and model TFLOP/s against the
           device's dense bfloat16 peak. Then --cp-long-tokens (1,048,576) if the budget allows.

It runs from a plain copy of the repository (nothing installed): `splitserve/` finds its
subpackages beside it. Before any section it checks once that they import here: a machine that
lacks one of the project's dependencies (grpcio-health-checking, say) or has a protobuf or grpcio
older than the generated stubs need (pyproject.toml's minimums) fails every section with that
one module's name; carry those as wheels (the device notes say how) and put them on PYTHONPATH.

Each section runs in a child process with the time the budget has left (a hung or crashed
section costs only itself) and reports one JSON object; the suite writes them all to
OUT/gpu_suite.json and a readable table to OUT/gpu_suite.txt (and stdout).

    benchmarks/gpu_suite.sh                                   # everything, 8 minutes at most
    benchmarks/gpu_suite.sh --sections engine,cp --out /tmp/gpu
    python -m benchmarks.gpu_suite --dry-run                  # the plan, on any machine
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger("benchmarks.gpu_suite")

SECTIONS = ("kv_nccl", "engine", "parity", "cp")
# Dense bfloat16 tensor-core peaks in TFLOP/s (no sparsity), from the vendors' data sheets;
# matched against torch.cuda.get_device_name, first match wins.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 6000 Ada", 364.0),
)
ONE_B = {"hidden_size": 2048, "intermediate_size": 8192, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8, "vocab_size": 32000,
         "max_position_embeddings": 4096, "dtype": "bfloat16"}  # engine.tiny_checkpoint.TinySpec
# What every section imports: on a machine that lacks one (or has an older protobuf or grpcio
# than the generated stubs need) the suite says so once instead of failing each section.
PREFLIGHT = ("splitserve.engine.engine", "splitserve.proto.server", "splitserve.proto.kv_pb2_grpc", "splitserve.proto.worker_pb2_grpc",
             "splitserve.cluster.worker_runtime", "splitserve.prefill_worker.cp", "benchmarks.gpu_sections")
PARITY_PROMPTS = 4  # requests compared token for token
PARITY_TOKENS = 32  # greedy tokens each


@dataclass
class SectionResult:
    name: str
    status: str  # "ok" | "skipped" | "failed" | "timeout"
    seconds: float = 0.0
    reason: str = ""
    result: dict[str, Any] = field(default_factory=dict)


# ---- plan (pure: tested on CPU) --------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole suite's time limit (default 480 = 8 minutes)")
    p.add_argument("--out", type=Path, help="folder for gpu_suite.json and gpu_suite.txt (default: a new one under /tmp)")
    p.add_argument("--model-dir", type=Path, help="the ~1B checkpoint: reused if it has a config.json, else written there")
    p.add_argument("--vllm-python", type=Path, help="a Python with vLLM installed: the engine section compares with it too")
    p.add_argument("--cp-tokens", type=int, default=131072, help="CP = 1 prefill length (default 131072)")
    p.add_argument("--cp-long-tokens", type=int, default=1048576, help="then this length if the budget allows (0: never)")
    p.add_argument("--kv-tokens", type=int, default=4096, help="KV of this many tokens of an 8B-shaped cache per transfer")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: from its name)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (sections, commands, limits) and exit")
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # internal: run one section in this process
    p.add_argument("--section-json", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.sections = list(dict.fromkeys(s for s in a.sections.split(",") if s))
    unknown = set(a.sections) - set(SECTIONS)
    if unknown or not a.sections:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}" if unknown else "--sections: none given")
    if a.budget_s <= 0 or a.cp_tokens < 1 or a.cp_long_tokens < 0 or a.kv_tokens < 1:
        p.error("--budget-s, --cp-tokens and --kv-tokens must be > 0, --cp-long-tokens >= 0")
    if a.vllm_python is not None and not a.vllm_python.is_file():
        p.error(f"--vllm-python: no such file {a.vllm_python}")
    return a


def skip_reason(section: str, gpus: int) -> str | None:
    """Why `section` cannot run on a machine with `gpus` CUDA devices, or None."""
    if gpus == 0:
        return "no CUDA device"
    if section == "kv_nccl" and gpus < 2:
        return "NCCL needs two GPUs (it refuses two ranks on one device)"
    return None


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    if override is not None:
        return override
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key.lower() in device_name.lower()), None)


def prefill_flops(tokens: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int) -> float:
    """Model FLOPs of a causal prefill of `tokens` (2 per multiply-add): the linear layers for
    every token, causal attention (QK^T and PV over the lower triangle), logits for the last."""
    linear = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * intermediate
    attention = 2 * 2 * heads * head_dim * tokens * (tokens + 1) / 2
    return layers * (2 * linear * tokens + attention) + 2 * hidden * vocab


def section_limit(budget_left: float, remaining_sections: int, minimum: float = 30.0) -> float:
    """The seconds a section may take: an equal share of what is left, at least `minimum`,
    never more than what is left."""
    share = budget_left / max(1, remaining_sections)
    return max(0.0, min(budget_left, max(minimum, share)))


def plan_commands(a: argparse.Namespace, model_dir: Path, out: Path) -> dict[str, list[str]]:
    """The child command of each section."""
    me = [sys.executable, "-m", "benchmarks.gpu_suite"]
    common = ["--model-dir", str(model_dir), "--cp-tokens", str(a.cp_tokens), "--cp-long-tokens", str(a.cp_long_tokens),
              "--kv-tokens", str(a.kv_tokens), *(["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops else [])]
    cmds = {s: [*me, "--section", s, "--section-json", str(out / f"{s}.json"), *common] for s in a.sections}
    if "engine" in cmds:
        cmds["engine"] = [sys.executable, "-m", "benchmarks.engine_throughput", "--device", "cuda", "--dtype", "bfloat16",
                          "--model-dir", str(model_dir), "--workload", "peers", "--repeats", "2", "--json", str(out / "engine.json"),
                          *(["--vllm-python", str(a.vllm_python)] if a.vllm_python else [])]
    if "kv_nccl" in cmds:
        cmds["kv_nccl"] = [sys.executable, "-m", "benchmarks.kv_transfer", "--device", "cuda", "--transports", "local,torch",
                           "--tokens", str(a.kv_tokens), "--no-overlap", "--json", str(out / "kv_nccl.json")]
    return cmds


# ---- the table -----------------------------------------------------------------------------
def render_table(env: dict[str, Any], results: list[SectionResult]) -> str:
    lines = [f"GPU suite: {env.get('device', '?')} x{env.get('gpus', 0)}, torch {env.get('torch', '?')}, "
             f"budget {env.get('budget_s', 0):.0f} s, took {env.get('seconds', 0):.0f} s"]
    head = f"{'section':<8} {'status':<8} {'time':>7}  summary"
    lines += [head, "-" * 100]
    for r in results:
        summary = summarize(r) if r.status == "ok" else r.reason
        lines.append(f"{r.name:<8} {r.status:<8} {r.seconds:>6.0f}s  {summary}")
    return "\n".join(lines)


def summarize(r: SectionResult) -> str:
    x = r.result
    if r.name == "kv_nccl":
        rows = {row["name"]: row for row in x.get("results", [])}
        t = rows.get("torch", {})
        return (f"torch transport {t.get('gb_per_s', 0):.1f} GB/s = {t.get('ratio', 0):.0%} of raw NCCL send/recv "
                f"({rows.get('NCCL send/recv', {}).get('gb_per_s', 0):.1f} GB/s); {x.get('bytes', 0) / 2**20:.0f} MiB")
    if r.name == "engine":
        parts = []
        for s in x.get("scenarios", []):
            text = f"{s['scenario']}: ours {s['ours']['tokens_per_s']:.0f} tok/s, {s['ratio_ours_over_hf']:.2f}x HF"
            if "ratio_ours_over_vllm" in s:
                text += f", {s['ratio_ours_over_vllm']:.2f}x vLLM"
            parts.append(text)
        return "; ".join(parts)
    if r.name == "parity":
        return (f"{x.get('identical', 0)}/{x.get('requests', 0)} requests token-identical to one engine over {x.get('transport', '?')} "
                f"({x.get('tokens', 0)} greedy tokens each)")
    if r.name == "cp":
        parts = []
        for row in x.get("runs", []):
            peak = f" = {row['fraction_of_peak']:.0%} of {row['peak_tflops']:.0f}" if row.get("peak_tflops") else " (peak unknown)"
            parts.append(f"{row['tokens']} tokens: {row['seconds']:.1f} s, {row['tokens_per_s']:.0f} tok/s, {row['tflops']:.0f} TFLOP/s{peak}")
        return "; ".join(parts) + (f"; {x['not_run']}" if x.get("not_run") else "")
    return json.dumps(x)[:200]


# ---- the driver ------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    """The sections' environment: they (and the workers they start) import this checkout,
    whatever their folder."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}


def run_section(name: str, cmd: list[str], limit: float, json_path: Path, log_path: Path) -> SectionResult:
    """Run one section's child within `limit` seconds; its JSON is the result."""
    start = time.monotonic()
    if limit <= 0:
        return SectionResult(name, "skipped", 0.0, "no time left in the budget")
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=child_env())
        try:
            rc = proc.wait(timeout=limit)
        except BaseException as e:  # the suite itself is being stopped: its section (and workers) go with it
            if not isinstance(e, subprocess.TimeoutExpired):
                os.killpg(proc.pid, 9)
                proc.wait()
                raise
            os.killpg(proc.pid, 15)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            return SectionResult(name, "timeout", time.monotonic() - start, f"over its {limit:.0f} s share; log: {log_path}")
    seconds = time.monotonic() - start
    if rc != 0 or not json_path.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        return SectionResult(name, "failed", seconds, f"exit status {rc}: {tail[0][:160]} (log: {log_path})")
    result = json.loads(json_path.read_text())
    if result.get("skipped"):
        return SectionResult(name, "skipped", seconds, result["skipped"])
    if result.get("failed"):  # it ran, and what it checks did not hold
        return SectionResult(name, "failed", seconds, result["failed"], result=result)
    return SectionResult(name, "ok", seconds, result=result)


def preflight() -> str | None:
    """Why the sections cannot even import what they need here, or None."""
    error = _run_setup([sys.executable, "-c", "import " + ", ".join(PREFLIGHT)], 300)
    return error and f"setup: the sections cannot import their modules here: {error}"


def _run_setup(cmd: list[str], timeout: float) -> str | None:
    """Run a setup step; why it failed (its last line of errors), or None."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        return f"did not finish within {timeout:.0f} s"
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1][:300]


def ensure_model(model_dir: Path) -> str | None:
    """Write the ~1B random checkpoint unless it is there; returns why that failed, or None."""
    if (model_dir / "config.json").is_file():
        return None
    partial = model_dir.with_name(model_dir.name + ".partial")  # renamed when whole: a killed write is not reused
    code = ("import json, shutil, sys; from splitserve.engine.tiny_checkpoint import TinySpec, write_tiny_checkpoint; "
            "shutil.rmtree(sys.argv[1], ignore_errors=True); write_tiny_checkpoint(sys.argv[1], TinySpec(**json.loads(sys.argv[2])))")
    error = _run_setup([sys.executable, "-c", code, str(partial), json.dumps(ONE_B)], 600)
    if error:
        return f"setup: writing the checkpoint in {model_dir} failed: {error}"
    partial.rename(model_dir)
    return None


def environment(budget: float) -> dict[str, Any]:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"torch": torch.__version__, "gpus": gpus, "device": torch.cuda.get_device_name(0) if gpus else "no CUDA device",
            "cuda": torch.version.cuda, "budget_s": budget}


def drive(a: argparse.Namespace) -> int:
    started = time.monotonic()
    out = a.out or Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = a.model_dir or out / "llama-1b"
    env = environment(a.budget_s)
    cmds = plan_commands(a, model_dir, out)
    if a.dry_run:
        for s in a.sections:
            reason = skip_reason(s, env["gpus"])
            print(f"{s}: " + (f"skipped ({reason})" if reason else shlex.join(cmds[s])))
        return 0
    results: list[SectionResult] = []
    runnable = [s for s in a.sections if skip_reason(s, env["gpus"]) is None]
    try:
        setup_error = preflight() if runnable else None
        model_error = ensure_model(model_dir) if setup_error is None and any(s != "kv_nccl" for s in runnable) else None
    except (KeyboardInterrupt, SystemExit) as e:  # stopped from outside: still say so in the report
        setup_error = model_error = f"the suite was stopped ({type(e).__name__}) while setting up"
    for s in a.sections:
        reason = skip_reason(s, env["gpus"])
        if reason is not None:
            results.append(SectionResult(s, "skipped", reason=reason))
            continue
        failed = setup_error or (model_error if s != "kv_nccl" else None)
        if failed:
            results.append(SectionResult(s, "failed", reason=failed))
            continue
        left = a.budget_s - (time.monotonic() - started)
        limit = section_limit(left, len(runnable) - runnable.index(s))
        logger.info("%s: up to %.0f s: %s", s, limit, shlex.join(cmds[s]))
        cmd = [*cmds[s], "--budget-s", f"{limit:.0f}"] if "--section" in cmds[s] else cmds[s]  # a section sizes its own work to it
        try:
            results.append(run_section(s, cmd, limit, out / f"{s}.json", out / f"{s}.log"))
        except (KeyboardInterrupt, SystemExit) as e:  # stopped from outside: report what ran, not nothing
            results.append(SectionResult(s, "failed", reason=f"the suite was stopped ({type(e).__name__}) during this section"))
            break
    env["seconds"] = time.monotonic() - started
    table = render_table(env, results)
    report = {"command": shlex.join(["benchmarks/gpu_suite.sh", *sys.argv[1:]]), "environment": env,
              "sections": [asdict(r) for r in results]}
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_suite.txt").write_text(table + "\n")
    print(table)
    print(f"written: {out / 'gpu_suite.json'}, {out / 'gpu_suite.txt'}")
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if a.section is not None:
        from benchmarks.gpu_sections import run

        result = run(a.section, a)
        a.section_json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    return drive(a)


def _stopped(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stopped)  # the shell script's backstop ends the driver as Ctrl-C does: its section goes too
    sys.exit(main())
