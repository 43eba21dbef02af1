"""The GPU suite's CPU-side plumbing: arguments, the plan, the budget, the table. No GPU here:
the sections themselves are skipped, never faked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import gpu_suite as g


def test_defaults_run_every_section_in_eight_minutes() -> None:
    a = g.parse_args([])
    assert a.sections == list(g.SECTIONS) and a.budget_s == 480 and a.cp_tokens == 131072 and a.cp_long_tokens == 1048576


@pytest.mark.parametrize("argv, message", [
    (["--sections", "engine,warp"], "unknown ['warp']"),
    (["--sections", ","], "none given"),
    (["--budget-s", "0"], "--budget-s"),
    (["--vllm-python", "/no/such/python"], "no such file"),
])
def test_bad_arguments_name_the_flag(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        g.parse_args(argv)
    assert message in capsys.readouterr().err


def test_sections_say_why_they_cannot_run() -> None:
    assert all(g.skip_reason(s, 0) == "no CUDA device" for s in g.SECTIONS)
    assert "two GPUs" in g.skip_reason("kv_nccl", 1)
    assert g.skip_reason("parity", 1) is None and g.skip_reason("kv_nccl", 2) is None


def test_peak_lookup_prefers_the_specific_name() -> None:
    assert g.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert g.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert g.peak_tflops("NVIDIA H200") == 989.0
    assert g.peak_tflops("Some Future GPU") is None and g.peak_tflops("Some Future GPU", 123.0) == 123.0


def test_prefill_flops_counts_linear_layers_and_causal_attention() -> None:
    # one layer, hidden 2, one head of dim 2, intermediate 1, vocab 3, two tokens
    linear = 2 * 3 * 2 + 2 * 2 + 3 * 2 * 1  # qkv, o, gate/up/down multiply-adds per token
    attention = 2 * 2 * 1 * 2 * (2 * 3 / 2)  # QK^T and PV over the 3 causal pairs
    assert g.prefill_flops(2, 2, 1, 1, 1, 1, 2, 3) == 2 * linear * 2 + attention + 2 * 2 * 3


def test_budget_shares_and_plan(tmp_path: Path) -> None:
    assert g.section_limit(480, 4) == 120 and g.section_limit(40, 4) == 30 and g.section_limit(10, 2) == 10
    assert g.section_limit(-5, 1) == 0
    a = g.parse_args(["--sections", "engine,cp", "--vllm-python", sys.executable])
    cmds = g.plan_commands(a, tmp_path / "m", tmp_path)
    assert list(cmds) == ["engine", "cp"]
    assert cmds["engine"][2] == "benchmarks.engine_throughput" and "bfloat16" in cmds["engine"] and sys.executable in cmds["engine"]
    assert cmds["cp"][cmds["cp"].index("--section") + 1] == "cp" and "131072" in cmds["cp"]


def test_a_section_that_overruns_is_stopped_and_reported(tmp_path: Path) -> None:
    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    r = g.run_section("cp", slow, 0.5, tmp_path / "cp.json", tmp_path / "cp.log")
    assert r.status == "timeout" and r.seconds < 15
    failed = g.run_section("cp", [sys.executable, "-c", "raise SystemExit('boom')"], 30, tmp_path / "x.json", tmp_path / "x.log")
    assert failed.status == "failed" and "boom" in failed.reason
    writes = [sys.executable, "-c", f"open({str(tmp_path / 'ok.json')!r}, 'w').write('{{\"runs\": []}}')"]
    assert g.run_section("cp", writes, 30, tmp_path / "ok.json", tmp_path / "ok.log").status == "ok"


def test_the_table_summarizes_each_section() -> None:
    results = [
        g.SectionResult("kv_nccl", "skipped", reason="NCCL needs two GPUs (it refuses two ranks on one device)"),
        g.SectionResult("engine", "ok", 95.0, result={"scenarios": [
            {"scenario": "32 requests", "ours": {"tokens_per_s": 3100.0}, "ratio_ours_over_hf": 4.2, "ratio_ours_over_vllm": 0.9}]}),
        g.SectionResult("parity", "ok", 60.0, result={"identical": 4, "requests": 4, "transport": "torch (NCCL)", "tokens": 32}),
        g.SectionResult("cp", "ok", 80.0, result={"runs": [
            {"tokens": 131072, "seconds": 20.0, "tokens_per_s": 6553.6, "tflops": 150.0, "peak_tflops": 989.0, "fraction_of_peak": 0.15}],
            "skipped": "1048576 tokens skipped: estimated 1280 s"}),
        g.SectionResult("kv_nccl", "timeout", 120.0, reason="over its 120 s share"),
    ]
    table = g.render_table({"device": "NVIDIA H200", "gpus": 1, "torch": "2.x", "budget_s": 480, "seconds": 300}, results)
    assert "NVIDIA H200 x1" in table and "two GPUs" in table
    assert "32 requests: ours 3100 tok/s, 4.20x HF, 0.90x vLLM" in table
    assert "4/4 requests token-identical to one engine over torch (NCCL)" in table
    assert "131072 tokens: 20.0 s, 6554 tok/s, 150 TFLOP/s = 15% of 989" in table and "1048576 tokens skipped" in table
    assert "over its 120 s share" in table


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine this would run the real suite")
def test_without_a_gpu_everything_is_skipped_and_written(tmp_path: Path, capsys) -> None:
    assert g.main(["--out", str(tmp_path), "--budget-s", "30"]) == 0
    assert (tmp_path / "gpu_suite.json").is_file() and "no CUDA device" in (tmp_path / "gpu_suite.txt").read_text()
    assert g.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert "skipped (no CUDA device)" in capsys.readouterr().out
