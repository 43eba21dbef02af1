"""A throw-away Redis server for `splitserve serve` (and tests): `redis-server` from PATH on a
free loopback port, with a generated password, no persistence, stopped with the run."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from splitserve.cluster.net import free_port


class EmbeddedRedis:
    """redis-server on loopback with a generated password (given in a file of mode 0600, not on
    its command line where any local user could read it), optionally with TLS."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, timeout: float = 20.0, password: str | None = None,
                 tls: tuple[str, str, str] | None = None) -> None:
        """`tls`: (cert file, key file, CA file); then clients use rediss:// with that CA."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found on PATH: install Redis (apt-get install redis-server) or set redis_url in cluster.yaml")
        self.host, self.port = host, port or free_port(host)
        self.password = password or secrets.token_urlsafe(24)
        self.tls = tls
        self._dir = tempfile.mkdtemp(prefix="splitserve-redis-")
        conf = Path(self._dir) / "redis.conf"
        lines = [f"bind {host}", "protected-mode yes", f"requirepass {self.password}", 'save ""', "appendonly no"]
        if tls:
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {tls[0]}", f"tls-key-file {tls[1]}", f"tls-ca-cert-file {tls[2]}",
                      "tls-auth-clients no"]
        else:
            lines += [f"port {self.port}"]
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)
        self.proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
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
        if self.tls:
            return f"rediss://:{self.password}@{self.host}:{self.port}/0?ssl_ca_certs={self.tls[2]}"
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self._dir, ignore_errors=True)
