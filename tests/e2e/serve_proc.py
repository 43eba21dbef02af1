"""`splitserve serve` as a subprocess for end-to-end tests: started, parsed, always stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from tests.e2e.procs import ROOT

READY = re.compile(r"splitserve ready: http (\S+)\s+grpc (\S+)")


@dataclass
class Serve:
    popen: subprocess.Popen
    http: str = ""
    grpc: str = ""
    log: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 90.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)


def start_serve(*args: str, timeout: float = 300.0) -> Serve:
    name = f"t{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    popen = subprocess.Popen(
        [sys.executable, "-m", "splitserve.cluster.cli", "serve", "--http-port", "0", "--grpc-port", "0", "--name", name, *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    serve = Serve(popen)
    ready = threading.Event()

    def pump() -> None:
        for line in popen.stdout:
            serve.log.append(line.rstrip())
            m = READY.search(line)
            if m:
                serve.http, serve.grpc = m.group(1), m.group(2)
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if popen.poll() is not None or time.monotonic() > deadline:
            serve.stop()
            raise RuntimeError("splitserve serve did not become ready:\n" + "\n".join(serve.log[-60:]))
    return serve
