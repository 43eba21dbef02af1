"""The GPU suite's CPU-side plumbing: arguments, the plan, the budget, the table. No GPU here:
the sections themselves are skipped, never faked."""

from __future__ import annotations

import json
import os
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
    part = [sys.executable, "-c", f"open({str(tmp_path / 'p.json')!r}, 'w').write('{{\"runs\": [], \"not_run\": \"1048576 tokens skipped\"}}')"]
    assert g.run_section("cp", part, 30, tmp_path / "p.json", tmp_path / "p.log").status == "ok"  # the long run aside, it ran
    mismatch = [sys.executable, "-c", f"open({str(tmp_path / 'm.json')!r}, 'w').write('{{\"failed\": \"1/4 requests differ\"}}')"]
    r = g.run_section("parity", mismatch, 30, tmp_path / "m.json", tmp_path / "m.log")
    assert r.status == "failed" and r.reason == "1/4 requests differ"  # a check that did not hold is not "ok"


def test_what_the_sections_need_is_checked_once_and_reported(tmp_path: Path, monkeypatch) -> None:
    """A machine that lacks a module (or the checkpoint cannot be written) fails every section
    with that one reason, and the JSON and table are still written; none of it needs a GPU."""
    assert g.preflight() is None  # this machine has everything
    monkeypatch.setattr(g, "environment", lambda budget: {"torch": "x", "gpus": 1, "device": "pretend", "cuda": None, "budget_s": budget})
    monkeypatch.setattr(g, "PREFLIGHT", ("splitserve.engine.engine", "no_such_module_here"))
    before = dict(os.environ)
    assert g.main(["--out", str(tmp_path / "a"), "--budget-s", "60"]) == 1
    assert dict(os.environ) == before
    report = json.loads((tmp_path / "a" / "gpu_suite.json").read_text())
    status = {r["name"]: (r["status"], r["reason"]) for r in report["sections"]}
    assert status["kv_nccl"][0] == "skipped" and all(status[s][0] == "failed" and "no_such_module_here" in status[s][1] for s in ("engine", "parity", "cp"))
    monkeypatch.setattr(g, "PREFLIGHT", ("json",))
    monkeypatch.setattr(g, "ONE_B", {**g.ONE_B, "vocab_size": 10})  # TinySpec refuses it
    assert g.main(["--out", str(tmp_path / "b"), "--budget-s", "60", "--sections", "cp"]) == 1
    assert "writing the checkpoint" in (tmp_path / "b" / "gpu_suite.txt").read_text() and "vocab_size" in (tmp_path / "b" / "gpu_suite.txt").read_text()


def test_the_checkpoint_is_written_by_the_engine_s_own_writer(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(g, "ONE_B", {**g.ONE_B, "hidden_size": 64, "intermediate_size": 128, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
                                     "vocab_size": 512})
    assert g.ensure_model(tmp_path / "m") is None
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["hidden_size"], config["torch_dtype"]) == (64, "bfloat16")


def test_the_table_summarizes_each_section() -> None:
    results = [
        g.SectionResult("kv_nccl", "skipped", reason="NCCL needs two GPUs (it refuses two ranks on one device)"),
        g.SectionResult("engine", "ok", 95.0, result={"scenarios": [
            {"scenario": "32 requests", "ours": {"tokens_per_s": 3100.0}, "ratio_ours_over_hf": 4.2, "ratio_ours_over_vllm": 0.9}]}),
        g.SectionResult("parity", "ok", 60.0, result={"identical": 4, "requests": 4, "transport": "torch (NCCL)", "tokens": 32}),
        g.SectionResult("cp", "ok", 80.0, result={"runs": [
            {"tokens": 131072, "seconds": 20.0, "tokens_per_s": 6553.6, "tflops": 150.0, "peak_tflops": 989.0, "fraction_of_peak": 0.15}],
            "not_run": "1048576 tokens skipped: estimated 1280 s"}),
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
    before = dict(os.environ)
    assert g.main(["--out", str(tmp_path), "--budget-s", "30"]) == 0
    assert dict(os.environ) == before  # the sections' environment is theirs (a leaked PYTHONPATH changed later tests)
    assert (tmp_path / "gpu_suite.json").is_file() and "no CUDA device" in (tmp_path / "gpu_suite.txt").read_text()
    assert g.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert "skipped (no CUDA device)" in capsys.readouterr().out


def test_a_stopped_suite_takes_its_running_section_along(tmp_path: Path) -> None:
    """The shell script's backstop sends TERM: the driver must not leave a section (and the
    workers in its process group) running on the GPU."""
    import subprocess
    import time

    pid_file = tmp_path / "section.pid"
    section = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    driver = ("import signal, sys\nfrom pathlib import Path\nfrom benchmarks import gpu_suite as g\nsignal.signal(signal.SIGTERM, g._stopped)\n"
              f"try:\n    g.run_section('cp', [sys.executable, '-c', {section!r}], 120, Path({str(tmp_path / 'cp.json')!r}), Path({str(tmp_path / 'cp.log')!r}))\n"
              "except KeyboardInterrupt:\n    sys.exit(3)\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=Path(g.__file__).resolve().parents[1])
    end = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < end:
        time.sleep(0.05)
    proc.terminate()
    assert proc.wait(30) == 3
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_the_shell_script_runs_the_driver_with_a_backstop_past_the_budget(tmp_path: Path) -> None:
    import subprocess

    root = Path(g.__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_suite.sh"), "--budget-s", "20", "--out", str(tmp_path), "--dry-run"],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "cp:" in done.stdout, done.stderr
