"""README.md's Quick start, run as written: make the tiny model and `splitserve serve` it, then
the `curl` completion (ports 8000 / 50051 on loopback, the README's own). The set-up line is
what `.ci/run` itself runs, and the test command is the one running this; both are checked to
be exactly those."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line[4:] for line in section.splitlines() if line.startswith("    ")]


def test_readme_stands_alone() -> None:
    text = (ROOT / "README.md").read_text()
    assert "../" not in text, "README.md points outside the repository"
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in link:
            assert (ROOT / link).exists(), f"README.md links to {link}, which is not in the repository"


def test_quick_start_commands_are_what_ci_runs() -> None:
    setup, serve, curl, tests = quick_start()
    assert setup == "./scripts/install.sh && . .venv/bin/activate"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/install.sh" in ci and ci.rstrip().splitlines()[-1] == tests


def test_quick_start_serves_a_completion() -> None:
    _, serve_line, curl_line, _ = quick_start()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    serve = subprocess.Popen(["bash", "-c", serve_line], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    log: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in serve.stdout:
            log.append(line.rstrip())
            if line.startswith("splitserve ready:"):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not ready.wait(0.2):
            assert serve.poll() is None and time.monotonic() < deadline, "\n".join(log[-40:])
        out = subprocess.run(["bash", "-c", curl_line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        body = json.loads(out.stdout)
        text = body["choices"][0]["text"]
        assert body["usage"]["completion_tokens"] >= 1 and "</s>" not in text and "<s>" not in text
    finally:
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C, as the README says
        try:
            serve.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(10)
    assert serve.returncode == 0, "\n".join(log[-40:])
