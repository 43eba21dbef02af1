"""Start worker processes on loopback for a test and always clean them up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def wait_until(cond: Callable[[], bool], timeout: float, what: str, ignore: tuple[type[BaseException], ...] = (), poll: float = 0.05) -> None:
    """Poll `cond` until it holds; `ignore`: errors that mean "not yet" (a cluster restarting)."""
    end = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except ignore:
            pass
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(poll)


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


def start(module: str, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> Proc:
    """Run `python -m module args...` and wait for its ready line."""
    return launch(module, *args, env=env).wait(timeout)


def launch(module: str, *args: str, env: dict[str, str] | None = None) -> "Launched":
    """Start `python -m module args...` without waiting (start several, then wait for all);
    `env`: variables set for it on top of this process's."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    popen = subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return Launched(module, Proc(popen, {}))


class Launched:
    def __init__(self, module: str, proc: Proc) -> None:
        self.module, self.proc = module, proc
        self._got = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.popen.stdout:
            self.proc.log.append(line.rstrip())
            if not self._got.is_set() and line.startswith("{") and '"ready"' in line:
                self.proc.ready = json.loads(line)
                self._got.set()

    def wait(self, timeout: float = 120.0) -> Proc:
        deadline = time.monotonic() + timeout
        while not self._got.wait(0.1):
            if self.proc.popen.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"{self.module} did not become ready:\n" + "\n".join(self.proc.log[-40:]))
        return self.proc
