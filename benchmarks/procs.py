"""Processes the benchmarks start: children with a JSON ready line, and a small cluster of
hand-started workers and routers around an embedded Redis, all on loopback, always stopped."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


class Child:
    """`python -m ARGS...`, its output pumped (last lines kept for errors), its JSON ready line parsed."""

    def __init__(self, name: str, args: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None, cpus: str | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.name, self.ready, self.log, self._got = name, {}, collections.deque(maxlen=40), threading.Event()
        pin = ["taskset", "-c", cpus] if cpus else []  # every thread of the process on these CPUs
        self.popen = subprocess.Popen([*pin, sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)  # no preexec_fn: forking next to gRPC threads can crash the child
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.popen.stdout:
            self.log.append(line.rstrip())
            if not self._got.is_set() and line.startswith("{") and '"ready"' in line:
                self.ready = json.loads(line)
                self._got.set()

    def wait_ready(self, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while not self._got.wait(0.1):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not become ready:\n" + "\n".join(self.log))
        return self.ready

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


class BenchCluster:
    """Routers and workers joined through one Redis (a namespace per cluster). `start` returns
    once the first router's registry lists every worker ready."""

    def __init__(self, model: Path, redis_url: str, tmp: Path, config: dict | None = None) -> None:
        self.model, self.redis_url, self.tmp = model, redis_url, tmp
        self.name = f"bench{uuid.uuid4().hex[:8]}"
        base = {"name": self.name, "model": {"path": str(model), "dtype": "float32"}, "redis_url": redis_url,
                "heartbeat_seconds": 0.5, "heartbeat_ttl_seconds": 3.0}
        self.config = _merge(base, config or {})
        self.config["router"] = {"host": HOST, "http_port": 0, "grpc_port": 0, **self.config.get("router", {})}
        self.workers: list[Child] = []
        self.routers: list[Child] = []

    def start(self, workers: list[tuple], routers: int = 1, timeout: float = 300.0, cpus: dict[str, str] | None = None) -> "BenchCluster":
        """`workers`: (role, extra flags[, CPUs]) each, CPUs as a taskset list; `cpus`: role ->
        the CPUs of that role's workers when a worker names none."""
        path = self.tmp / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.config))
        self.routers = [Child("router", ["splitserve.router", "-f", str(path)]) for _ in range(routers)]
        self.workers = []
        for i, (role, flags, *pin) in enumerate(workers):
            args = [f"splitserve.{role}_worker", "--model", str(self.model), "--dtype", "float32", "--redis-url", self.redis_url,
                    "--cluster", self.name, "--heartbeat-seconds", "0.5", "--heartbeat-ttl-seconds", "3", *flags]
            self.workers.append(Child(f"{role} {i}", args, cpus=pin[0] if pin else (cpus or {}).get(role)))
        for c in [*self.routers, *self.workers]:
            c.wait_ready(timeout)
        from splitserve.proto.client import Client

        ids = {w.ready["worker_id"] for w in self.workers}
        with Client(self.grpc(0)) as c:
            deadline = time.monotonic() + 60
            while not ids <= {w.worker_id for w in c.status().workers if w.state == "ready"}:
                if time.monotonic() > deadline:
                    raise TimeoutError("workers did not register")
                time.sleep(0.2)
        time.sleep(1.0)  # the routers' views and prefix indexes catch up
        return self

    def grpc(self, router: int = 0) -> str:
        return self.routers[router].ready["grpc"]

    def http(self, router: int = 0) -> str:
        return self.routers[router].ready["http"]

    def stop(self) -> None:
        for c in [*self.routers, *self.workers]:
            c.stop()


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
