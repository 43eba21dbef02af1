"""A throw-away Redis server for `splitserve serve` (and tests): `redis-server` from PATH on a
free loopback port, no persistence, stopped with the run."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import redis


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None, timeout: float = 20.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found on PATH: install Redis (apt-get install redis-server) or set redis_url in cluster.yaml")
        self.host, self.port = host, port or free_port(host)
        self.proc = subprocess.Popen(
            [binary, "--bind", host, "--port", str(self.port), "--save", "", "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        client = redis.Redis(host=host, port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on {host}:{self.port}") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
