"""The `splitserve` command line, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from splitserve.engine import LLM, SamplingParams


def splitserve(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitserve.cluster.cli", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_init_tiny_writes_a_loadable_checkpoint_and_generate_uses_it(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    r = splitserve("model", "init-tiny", str(out), "--arch", "qwen2", "--num-layers", "3", "--shard-size", "65536")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["num_hidden_layers"] == 3
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()

    expected = LLM(str(out)).generate(["Hello"], SamplingParams(temperature=0, max_tokens=8))[0].text
    r = splitserve("generate", "--model", str(out), "--max-tokens", "8", "Hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


def test_init_tiny_is_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert splitserve("model", "init-tiny", str(tmp_path / name), "--seed", "3").returncode == 0
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_errors_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    r = splitserve("generate", "--model", str(tmp_path), "hi")
    assert r.returncode == 2
    assert r.stderr.startswith("splitserve: error: config.json") and "Traceback" not in r.stderr
    r = splitserve("model", "init-tiny", str(tmp_path / "x"), "--num-heads", "4", "--num-kv-heads", "3")
    assert r.returncode == 2 and "num_kv_heads" in r.stderr
