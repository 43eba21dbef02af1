"""Operating a running cluster: scaling and draining under traffic, a decode worker's process
killed (Ray restarts it), and Redis restarted (workers re-register)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from splitserve.cluster.redis_server import EmbeddedRedis
from splitserve.proto.client import Client as _Client
from splitserve.proto.client import InvalidArgumentError, PermissionDeniedError, SplitserveError, UnauthenticatedError
from tests.e2e.procs import wait_until
from tests.e2e.serve_proc import start_serve

KEY = "test-key-1"  # an API key: inference only
ADMIN = "test-admin-key"  # an admin key: everything


def Client(address: str, **kw) -> _Client:  # noqa: N802 - every client of this module carries the admin key
    return _Client(address, api_key=ADMIN, **kw)


@pytest.fixture(scope="module")
def cluster(e2e_model: Path, tmp_path_factory):
    redis = EmbeddedRedis()
    cfg = tmp_path_factory.mktemp("ops") / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(e2e_model), "dtype": "float32"}, "redis_url": redis.url, "api_keys": [KEY],
                                   "admin_keys": [ADMIN], "max_replicas": 3,
                                   "router": {"max_retries": 2}, "heartbeat_seconds": 0.5, "heartbeat_ttl_seconds": 3.0}))
    serve = start_serve("--config", str(cfg))
    yield serve, redis
    serve.stop()
    redis.stop()


class Traffic:
    """Requests in a loop from a few threads until stopped; records outcomes and decode workers."""

    def __init__(self, address: str, threads: int = 3) -> None:
        self.client = Client(address, timeout=60)
        self.stop_flag = threading.Event()
        self.ok = 0
        self.errors: list[str] = []
        self.decode_workers: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop_flag.is_set():
            n += 1
            try:
                done = self.client.generate([5 + i, 6, 7, 8 + n % 50] * 8, max_tokens=24, temperature=0, ignore_eos=True)
                with self._lock:
                    self.ok += 1
                    self.decode_workers[done.timings["decode_worker"]] += 1
            except SplitserveError as e:
                with self._lock:
                    self.errors.append(f"{e.status}: {e}")

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        for t in self._threads:
            t.join(90)
        self.client.close()


def decode_workers(c: Client) -> list:
    return [w for w in c.status().workers if w.role == "decode"]


def test_scale_up_then_drain_under_traffic_loses_no_request(cluster) -> None:
    serve, _ = cluster
    with Client(serve.grpc) as admin, Traffic(serve.grpc) as traffic:
        time.sleep(1)
        admin.scale(decode=2)
        wait_until(lambda: sum(w.state == "ready" for w in decode_workers(admin)) == 2, 120, "a second decode worker", ignore=(SplitserveError,), poll=0.2)
        wait_until(lambda: len(traffic.decode_workers) == 2, 60, "traffic on both decode workers", ignore=(SplitserveError,), poll=0.2)
        victim = decode_workers(admin)[0].worker_id
        admin.drain(victim)
        admin.drain(victim)  # asked again (a retried call): the pool shrinks once, not twice
        wait_until(lambda: victim not in {w.worker_id for w in decode_workers(admin)}, 120, f"{victim} drained and gone", ignore=(SplitserveError,), poll=0.2)
        served_after = traffic.ok
        wait_until(lambda: traffic.ok > served_after + 5, 60, "traffic continuing on the remaining worker", ignore=(SplitserveError,), poll=0.2)
    assert traffic.errors == [], traffic.errors[:5]
    assert len(traffic.decode_workers) == 2 and min(traffic.decode_workers.values()) > 0
    assert admin_targets(serve) == {"prefill": 1, "decode": 1}


def admin_targets(serve) -> dict:
    with Client(serve.grpc) as c:
        return dict(c.status().targets)


def test_killed_decode_worker_is_restarted_and_nothing_is_stranded(cluster) -> None:
    serve, _ = cluster
    with Client(serve.grpc, timeout=60) as c:
        (victim,) = decode_workers(c)
        errors: list[SplitserveError] = []

        def long_request() -> None:
            try:
                c.generate([9] * 30, max_tokens=3000, temperature=0, ignore_eos=True)
            except SplitserveError as e:
                errors.append(e)

        t = threading.Thread(target=long_request)
        t.start()
        wait_until(lambda: decode_workers(c)[0].running >= 1, 30, "the long request decoding", ignore=(SplitserveError,), poll=0.2)
        os.kill(victim.pid, signal.SIGKILL)
        t.join(60)
        assert not t.is_alive(), "the in-flight request hung after its decode worker died"
        assert len(errors) == 1 and errors[0].status == "UNAVAILABLE" and victim.worker_id in str(errors[0]), errors
        wait_until(lambda: any(w.worker_id == victim.worker_id and w.restarts >= 1 and w.state == "ready" and w.pid != victim.pid
                               for w in decode_workers(c)), 120, "Ray to restart the decode worker and it to re-register")
        wait_until(lambda: c.generate("after the restart", max_tokens=4, temperature=0).finish_reason is not None, 60, "serving to resume", ignore=(SplitserveError,), poll=0.2)
        wait_until(lambda: all(w.reserved_blocks == 0 and w.running == 0 for w in c.status().workers), 30, "no blocks held anywhere", ignore=(SplitserveError,), poll=0.2)
        prefill = [w for w in c.status().workers if w.role == "prefill"]
        assert prefill and all(w.used_blocks == 0 for w in prefill)


def test_redis_restart_workers_reregister_and_routing_resumes(cluster) -> None:
    serve, redis = cluster
    with Client(serve.grpc, timeout=60) as c:
        before = {w.worker_id for w in c.status().workers}
        port = redis.port
        redis.stop()
        time.sleep(2)
        redis.__init__(port=port, password=redis.password)  # same address and password, empty data
        wait_until(lambda: {w.worker_id for w in c.status().workers} == before, 30, "workers re-registered", ignore=(SplitserveError,), poll=0.2)
        wait_until(lambda: dict(c.status().targets) == {"prefill": 1, "decode": 1}, 10, "the controller to restore its targets", ignore=(SplitserveError,), poll=0.2)
        assert {w.worker_id for w in c.status().workers} == before  # and it drained nobody meanwhile
        assert c.generate("after redis", max_tokens=4, temperature=0).finish_reason == "length"


def test_api_keys_are_required_when_configured(cluster) -> None:
    import http.client
    import urllib.parse

    serve, _ = cluster
    with _Client(serve.grpc) as anonymous, pytest.raises(UnauthenticatedError):
        anonymous.generate("hi", max_tokens=2)
    with _Client(serve.grpc, api_key="wrong") as wrong, pytest.raises(UnauthenticatedError):
        wrong.generate("hi", max_tokens=2)
    u = urllib.parse.urlparse(serve.http)
    for headers, status in [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": f"Bearer {KEY}"}, 200)]:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("POST", "/v1/completions", body=b'{"prompt": "hi", "max_tokens": 2}', headers={"Content-Type": "application/json", **headers})
        assert conn.getresponse().status == status


def test_admin_keys_alone_administer_the_cluster_within_max_replicas(cluster) -> None:
    """With admin_keys set, an API key generates but may not scale, drain, shut down or read the
    cluster (any API user could shut it down); the admin key may, up to max_replicas per pool."""
    serve, _ = cluster
    with _Client(serve.grpc, api_key=KEY, timeout=60) as user:
        assert user.generate("hi", max_tokens=2).finish_reason == "length"
        for call in (lambda: user.scale(decode=2), user.status, user.shutdown, lambda: user.drain("any")):
            with pytest.raises(PermissionDeniedError) as e:
                call()
            assert "admin_keys" in str(e.value)
    with Client(serve.grpc, timeout=60) as admin:
        before = dict(admin.status().targets)
        with pytest.raises(InvalidArgumentError) as e:
            admin.scale(prefill=1, decode=500)  # refused whole: prefill is not set either
        assert "decode: replicas must be in [0, 3] (max_replicas), got 500" in str(e.value)
        assert dict(admin.status().targets) == before


def test_admin_cli_commands(cluster) -> None:
    import subprocess
    import sys

    serve, _ = cluster

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "splitserve.cluster.cli", *args, "--router", serve.grpc, "--api-key", ADMIN],
                              capture_output=True, text=True, timeout=60)

    status = cli("status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith("cluster ") and "WORKER" in lines[1] and "BLOCKS_USED" in lines[1]
    assert sum(" decode " in line for line in lines) == 1 and sum(" prefill " in line for line in lines) == 1
    scaled = cli("scale", "decode=1", "prefill=1")
    assert scaled.returncode == 0 and "decode=1" in scaled.stdout
    bad = cli("scale", "decoders=2")
    assert bad.returncode == 2 and "expected prefill=N or decode=N" in bad.stderr
    missing = cli("drain", "no-such-worker")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "no-such-worker" in missing.stderr
