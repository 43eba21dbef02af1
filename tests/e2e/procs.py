"""Start worker processes on loopback for a test and always clean them up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    popen: subprocess.Popen
    ready: dict
    log: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.ready["address"]

    @property
    def worker_id(self) -> str:
        return self.ready["worker_id"]

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def start(module: str, *args: str, timeout: float = 120.0) -> Proc:
    """Run `python -m module args...` and wait for its ready line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    popen = subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    proc = Proc(popen, {})
    got = threading.Event()

    def pump() -> None:
        for line in popen.stdout:
            proc.log.append(line.rstrip())
            if not got.is_set() and line.startswith("{") and '"ready"' in line:
                proc.ready = json.loads(line)
                got.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not got.wait(0.1):
        if popen.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{module} did not become ready:\n" + "\n".join(proc.log[-40:]))
    return proc
