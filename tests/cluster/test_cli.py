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


def cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI's `main` in this process (no interpreter and torch import per call): exit code,
    stdout and stderr as `splitserve` gives them."""
    from splitserve.cluster.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_serve_on_a_port_in_use_says_which_at_once(tmp_path: Path, capsys) -> None:
    """Before: the HTTP port was found taken only once every worker had loaded (~50 s), and the
    gRPC port ended in a RuntimeError traceback."""
    import socket

    assert cli(capsys, "model", "init-tiny", str(tmp_path / "m")).returncode == 0
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        for flag, other, key in (("--http-port", "--grpc-port", "router.http_port"), ("--grpc-port", "--http-port", "router.grpc_port")):
            r = cli(capsys, "serve", "--model", str(tmp_path / "m"), flag, port, other, "0")
            assert r.returncode == 2 and r.stderr.startswith(f"splitserve: error: {key}: cannot listen on 127.0.0.1:{port}"), r.stderr
            assert "Traceback" not in r.stderr


def test_up_and_a_lone_router_say_what_is_wrong_in_one_line(tmp_path: Path, capsys) -> None:
    """Before: a traceback for an unreachable Redis (after Ray had started) and for a mistake in
    the file given to `python -m splitserve.router`."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: /nonexistent}\nredis_url: redis://127.0.0.1:1/0\nrouter: {http_port: 0, grpc_port: 0}\n")
    r = cli(capsys, "up", "-f", str(cfg))
    assert r.returncode == 1 and "splitserve: error: Redis: ConnectionError" in r.stderr and "Traceback" not in r.stderr, r.stderr
    cfg.write_text("model: {path: /m}\ncolour: blue\n")
    r = subprocess.run([sys.executable, "-m", "splitserve.router", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("python -m splitserve.router: error: colour: unknown key") and "Traceback" not in r.stderr


def test_init_tiny_never_replaces_a_folder_it_did_not_write_without_force(tmp_path: Path, capsys) -> None:
    """It replaced config.json and the weights of whatever checkpoint the folder held."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 32}')
    r = cli(capsys, "model", "init-tiny", str(real))
    assert r.returncode == 2 and "is not empty" in r.stderr and "--force" in r.stderr
    assert (real / "config.json").read_text() == '{"model_type": "llama", "num_hidden_layers": 32}'
    tiny = tmp_path / "tiny"
    assert cli(capsys, "model", "init-tiny", str(tiny)).returncode == 0
    r = cli(capsys, "model", "init-tiny", str(tiny))  # the same again (a rerun quick start, a restarted init container)
    assert r.returncode == 0 and r.stdout.startswith("kept the same")
    assert cli(capsys, "model", "init-tiny", str(tiny), "--seed", "7").returncode == 2  # another checkpoint: not over this one
    assert cli(capsys, "model", "init-tiny", str(tiny), "--seed", "7", "--force").returncode == 0
    assert json.loads((tiny / "splitserve_tiny.json").read_text())["seed"] == 7


def test_init_tiny_refuses_sizes_and_options_it_cannot_honour(tmp_path: Path, capsys) -> None:
    for args, named in ((["--num-layers", "-1"], "num_layers"), (["--hidden-size", "0"], "hidden_size"),
                        (["--sliding-window", "8"], "sliding_window is for arch mistral only")):
        r = cli(capsys, "model", "init-tiny", str(tmp_path / "x"), *args)
        assert r.returncode == 2 and named in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert cli(capsys, "model", "init-tiny", str(tmp_path / "m"), "--arch", "mistral", "--sliding-window", "8").returncode == 0


def test_scale_names_a_count_it_cannot_take(capsys) -> None:
    """A count beyond int32 was 'Value out of range', '²' passed isdigit and failed in int()."""
    for args in (["prefill=99999999999"], ["prefill=²"], ["prefill=1", "prefill=2"], ["gpu=1"]):
        r = cli(capsys, "scale", *args, "--router", "127.0.0.1:1")
        assert r.returncode == 2 and "expected prefill=N or decode=N" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
