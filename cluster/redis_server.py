"""A throw-away Redis server for `splitserve serve` (and tests): `redis-server` from PATH on a
free loopback port, with a generated password, no persistence, stopped with the run, and
restarted on the same port if it dies meanwhile (`supervise`)."""

from __future__ import annotations

import logging
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

from splitserve.cluster.net import free_port

logger = logging.getLogger(__name__)


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
        self._argv, self._timeout = [binary, str(conf)], timeout
        self._lock, self._stopping = threading.Lock(), threading.Event()
        try:
            self._launch()
        except RuntimeError:
            self.stop()
            raise

    def _launch(self) -> None:
        self.proc = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on {self.host}:{self.port}") from None
                time.sleep(0.05)

    def supervise(self, interval: float = 0.5) -> None:
        """Restart redis-server (same port and password, empty) whenever it exits, until `stop`:
        the cluster's workers re-register at their next heartbeat and the controller restores
        the pools, as after any Redis restart; without this a `serve` whose Redis died served
        503s until it was restarted by hand."""
        threading.Thread(target=self._watch, args=(interval,), name="redis-supervisor", daemon=True).start()

    def _watch(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            with self._lock:
                code = self.proc.poll()
                if code is None or self._stopping.is_set():
                    continue
                logger.warning("the embedded redis-server exited (code %s); restarting it on %s:%d", code, self.host, self.port)
                try:
                    self._launch()
                except RuntimeError as e:
                    logger.error("%s; trying again", e)

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://:{self.password}@{self.host}:{self.port}/0?ssl_ca_certs={self.tls[2]}"
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._stop_process()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _stop_process(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
