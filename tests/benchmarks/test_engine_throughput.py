"""benchmarks/engine_throughput.py's profile: where one run's time went, printed as a table."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.engine_throughput import Workload, print_profile, profile_ours
from splitserve.engine import LLM


def test_the_profile_accounts_for_the_run_and_names_the_engine_ops(llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    llm = LLM(str(llama_dir), dtype="float32", max_model_len=128)
    w = Workload("2 requests", [[1, 2, 3, 4, 5], [7, 8, 9]], [6, 4])
    p = profile_ours(llm, w, "cpu", top=8)
    ops = [r["op"] for r in p["rows"]]
    assert len(ops) == 10 and ops[-2:] == ["(other ops)", "(outside any op: Python)"]
    assert any("linear" in op or "addmm" in op or op == "aten::mm" for op in ops[:8])  # the model's GEMMs were seen
    # the ops counted are this thread's: together they cannot take longer than the run did
    assert 0 <= p["rows"][-1]["seconds"] < p["seconds"]
    print_profile(p)
    out = capsys.readouterr().out
    assert "profile of ours, 2 requests" in out and "(outside any op: Python)" in out
