"""A cluster made of plain processes on loopback: a Redis, one or more routers
(`python -m splitserve.router`) and workers started by hand that join through Redis
(`python -m splitserve.prefill_worker --redis-url ... --cluster ...`). No Ray: each test picks
each worker's flags (KV size, block size, lease, chunking), kills or pauses it, and reads its
counters directly."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import yaml

from splitserve.cluster.redis_server import EmbeddedRedis
from splitserve.proto import worker_pb2
from splitserve.proto.client import Client
from splitserve.proto.tls import TLSFiles, to_flags
from tests.e2e.procs import (
    Proc,
    launch,
    wait_until,  # noqa: F401 - tests import it from here too
)
from tests.e2e.workers import WorkerStub


def post(base: str, body: dict, timeout: float = 60.0) -> tuple[int, dict, dict]:
    """POST /v1/completions; returns (status, JSON body, headers with lower-case names)."""
    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"{}"), {k.lower(): v for k, v in r.getheaders()}


class InThread:
    """Run `fn` on a thread; `.result()` re-raises its exception or returns its value."""

    def __init__(self, fn) -> None:
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.value = fn()
        except BaseException as e:  # handed to the test thread
            self.error = e

    def result(self, timeout: float = 60.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the client hung"
        if self.error is not None:
            raise self.error
        return self.value


class LocalCluster:
    def __init__(self, model: Path, tmp: Path, redis: EmbeddedRedis, *, router: dict | None = None, **config) -> None:
        self.model, self.tmp, self.redis = model, tmp, redis
        self.name = f"t{uuid.uuid4().hex[:8]}"
        # every request disaggregated unless a test asks for selective disaggregation
        self.config = {"name": self.name, "model": {"path": str(model), "dtype": "float32"}, "redis_url": redis.url,
                       "heartbeat_seconds": 0.3, "heartbeat_ttl_seconds": 2.0, "routing": {"local_prefill_tokens": 0},
                       "router": {"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, **(router or {})}, **config}
        self.procs: list[Proc] = []
        self.routers: list[Proc] = []
        self.workers: dict[str, Proc] = {}

    # ---- processes -----------------------------------------------------------------------
    def start(self, *workers: tuple[str, list[str]], routers: int = 1) -> "LocalCluster":
        """Start routers and workers (`(role, extra flags)`) together; wait until the first
        router's registry shows every worker ready."""
        launched = [self._launch_router() for _ in range(routers)]
        launched += [self._launch_worker(role, flags) for role, flags in workers]
        procs = [w.wait() for w in launched]
        self.procs += procs
        self.routers += procs[:routers]
        for p in procs[routers:]:
            self.workers[p.worker_id] = p
        self.wait_workers(set(self.workers))
        return self

    def _launch_router(self):
        path = self.tmp / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.config))
        return launch("splitserve.router", "-f", str(path))

    def add_router(self) -> Proc:
        proc = self._launch_router().wait()
        self.procs.append(proc)
        self.routers.append(proc)
        time.sleep(1.0)  # its view polls the registry, its index reads the snapshots
        return proc

    def _launch_worker(self, role: str, flags: list[str]):
        beat, ttl = str(self.config["heartbeat_seconds"]), str(self.config["heartbeat_ttl_seconds"])
        token = ["--token", self.config["cluster_token"]] if self.config.get("cluster_token") else []
        return launch(f"splitserve.{role}_worker", "--model", str(self.model), "--dtype", "float32", "--redis-url", self.redis.url,
                      "--cluster", self.name, "--heartbeat-seconds", beat, "--heartbeat-ttl-seconds", ttl, *token, *to_flags(self.tls), *flags)

    def add_worker(self, role: str, *flags: str) -> Proc:
        proc = self._launch_worker(role, list(flags)).wait()
        self.procs.append(proc)
        self.workers[proc.worker_id] = proc
        self.wait_workers(set(self.workers))
        return proc

    def wait_workers(self, ids: set[str], timeout: float = 30.0) -> None:
        with self.client() as c:
            wait_until(lambda: ids <= {w.worker_id for w in c.status().workers if w.state == "ready"}, timeout, f"workers {sorted(ids)} registered")
        time.sleep(0.6)  # the routers' views poll the registry every 0.25 s

    def close(self) -> None:
        for p in self.procs:
            p.stop()

    # ---- access --------------------------------------------------------------------------
    @property
    def grpc(self) -> str:
        return self.routers[0].ready["grpc"]

    @property
    def http(self) -> str:
        return self.routers[0].ready["http"]

    @property
    def tls(self) -> TLSFiles | None:
        return TLSFiles(**self.config["tls"]) if self.config.get("tls") else None

    def client(self, router: int = 0, **kw) -> Client:
        if self.tls is not None:
            kw.setdefault("tls", self.tls.ca)
        return Client(self.routers[router].ready["grpc"], **kw)

    def stats(self, worker: Proc) -> worker_pb2.WorkerStats:
        """A worker's counters, read from the worker itself (not its last heartbeat)."""
        stub = WorkerStub(worker.address, self.config.get("cluster_token"), self.tls)
        try:
            return stub.stats(worker.ready["role"])
        finally:
            stub.channel.close()

    def assert_idle(self, timeout: float = 15.0) -> None:
        """Every live worker: no reserved blocks, no transfer, nothing running or queued."""
        for w in self.workers.values():
            if w.popen.poll() is None:
                wait_until(lambda w=w: _idle(self.stats(w)), timeout, f"{w.worker_id} idle with no reserved blocks")


def _idle(s: worker_pb2.WorkerStats) -> bool:
    return s.reserved_blocks == 0 and s.active_transfers == 0 and s.running_requests == 0 and s.waiting_requests == 0
