"""The controller's reconcile loop against a real Redis and a fake worker backend."""

from __future__ import annotations

import pytest

from splitserve.cluster.config import parse_cluster_config
from splitserve.cluster.controller import Controller
from splitserve.cluster.redis_server import EmbeddedRedis
from splitserve.cluster.registry import Registry, WorkerRecord


class FakeBackend:
    """Stands in for Ray: 'starting' a worker registers it as ready in Redis."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.workers: dict[str, str] = {}
        self.stopped: list[str] = []
        self.gone: set[str] = set()  # processes that died for good (restarts used up)
        self.specs: dict[str, object] = {}  # as started
        self.left: list = []  # the specs of the workers an earlier controller left running

    def start(self, spec, resources) -> None:
        self.workers[spec.worker_id] = spec.role
        self.specs[spec.worker_id] = spec
        self.registry.publish(WorkerRecord(spec.worker_id, spec.role, "addr"))

    def stop(self, worker_id: str) -> None:
        self.workers.pop(worker_id)
        self.stopped.append(worker_id)

    def alive(self) -> dict[str, str]:
        return dict(self.workers)

    def dead(self, worker_ids: list[str]) -> list[str]:
        return [w for w in worker_ids if w in self.gone]

    def adopt(self) -> list:
        self.workers.update({spec.worker_id: spec.role for spec in self.left})
        return list(self.left)

    def shutdown(self, keep_workers: bool = False) -> None:
        self.workers.clear()


@pytest.fixture(scope="module")
def redis_url():
    server = EmbeddedRedis()
    yield server.url
    server.stop()


@pytest.fixture
def setup(redis_url, request):
    config = parse_cluster_config({"name": request.node.name.replace("[", "-").replace("]", ""), "model": {"path": "m"}, "decode": {"replicas": 2}})
    registry = Registry(redis_url, config.name, ttl_seconds=60)
    registry.clear()
    backend = FakeBackend(registry)
    return Controller(config, backend, registry, redis_url), backend, registry


def by_role(backend: FakeBackend, role: str) -> list[str]:
    return [w for w, r in backend.workers.items() if r == role]


def test_reconcile_starts_the_configured_pools_and_is_idempotent(setup) -> None:
    controller, backend, _ = setup
    controller.reconcile()
    assert len(by_role(backend, "prefill")) == 1 and len(by_role(backend, "decode")) == 2
    before = dict(backend.workers)
    controller.reconcile()
    assert backend.workers == before


def test_a_new_controller_adopts_the_workers_left_running_and_replaces_those_whose_settings_changed(setup, redis_url) -> None:
    """`up --keep-workers` (the Helm chart's controller): its replacement takes over the
    running workers; only the pool whose worker settings cluster.yaml changed is replaced."""
    import dataclasses

    controller, backend, registry = setup
    controller.reconcile()
    prefill, decode = by_role(backend, "prefill"), by_role(backend, "decode")
    config = controller.config
    changed = dataclasses.replace(config, decode=dataclasses.replace(config.decode, kv_cache_memory=config.decode.kv_cache_memory // 2))
    successor = FakeBackend(registry)
    successor.left = list(backend.specs.values())
    second = Controller(changed, successor, registry, redis_url)
    assert second.adopt() == prefill
    assert sorted(successor.stopped) == sorted(decode) and not {r.worker_id for r in registry.workers()} & set(decode)
    second.reconcile()
    assert by_role(successor, "prefill") == prefill and len(by_role(successor, "decode")) == 2 and not set(decode) & set(successor.workers)


def test_keeping_the_workers_needs_an_existing_ray_cluster() -> None:
    from splitserve.cluster.config import ConfigError
    from splitserve.cluster.serve import start_cluster

    with pytest.raises(ConfigError, match="ray_address"):
        start_cluster(parse_cluster_config({"model": {"path": "m"}, "redis_url": "redis://127.0.0.1:1"}), embedded_redis=False, fresh=False,
                      with_router=False, keep_workers=True)


def test_scale_down_drains_the_newest_then_stops_it_once_drained(setup) -> None:
    controller, backend, registry = setup
    controller.reconcile()
    old, new = by_role(backend, "decode")
    registry.set_target("decode", 1)
    controller.reconcile()
    assert registry.draining() == {new} and new in backend.workers  # still finishing its requests
    registry.publish(WorkerRecord(new, "decode", "addr", state="drained"))
    controller.reconcile()
    assert backend.stopped == [new] and by_role(backend, "decode") == [old] and registry.draining() == set()


def test_lost_targets_are_restored_not_read_as_zero(setup) -> None:
    controller, backend, registry = setup
    controller.reconcile()
    registry.redis.delete(registry.prefix + "target")  # what a Redis restart looks like
    controller.reconcile()
    assert len(by_role(backend, "decode")) == 2 and registry.draining() == set()
    assert registry.targets() == {"prefill": 1, "decode": 2}


def test_heartbeat_records_expire(redis_url) -> None:
    import time

    registry = Registry(redis_url, "ttl-test", ttl_seconds=0.3)
    registry.publish(WorkerRecord("w1", "decode", "addr"))
    assert [r.worker_id for r in registry.workers()] == ["w1"]
    time.sleep(0.5)
    assert registry.workers() == []


def test_a_worker_whose_restarts_are_used_up_is_replaced(setup) -> None:
    controller, backend, registry = setup
    controller.reconcile()
    first, second = by_role(backend, "decode")
    for wid in (first, second):  # both stop beating: one is restarting, one is gone for good
        registry.forget(wid)
    backend.gone.add(first)
    controller.reconcile()
    assert first in backend.stopped and second not in backend.stopped
    decode = by_role(backend, "decode")
    assert len(decode) == 2 and first not in decode and second in decode


def test_draining_a_worker_twice_lowers_its_pool_once(setup) -> None:
    """A retried drain (or two routers asked at once) left the pool one worker short per call,
    and the controller then drained healthy workers to match."""
    controller, backend, registry = setup
    controller.reconcile()
    victim, other = by_role(backend, "decode")
    assert registry.drain_one(victim, "decode") and not registry.drain_one(victim, "decode")
    assert registry.targets()["decode"] == 1 and registry.draining() == {victim}
    controller.reconcile()
    assert registry.draining() == {victim} and other in backend.workers


def test_a_supervised_embedded_redis_that_dies_comes_back_on_its_address() -> None:
    """`serve`'s Redis killed: it stayed dead (a zombie), the registry unreachable, every request
    a 503 until `serve` was restarted by hand."""
    import os
    import signal
    import time

    import redis

    server = EmbeddedRedis()
    try:
        server.supervise(interval=0.05)
        first = server.proc.pid
        os.kill(first, signal.SIGKILL)
        client = redis.Redis.from_url(server.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the embedded Redis did not come back"
                time.sleep(0.05)
        assert server.proc.pid != first
    finally:
        server.stop()
    time.sleep(0.2)  # stopped on purpose: not restarted
    assert server.proc.poll() is not None


def test_a_start_that_fails_stops_its_controller(redis_url, monkeypatch) -> None:
    """The router failing to start (a port taken meanwhile) left the controller's loop running:
    it kept starting workers, and a second local Ray, in a process that was exiting."""
    import threading

    import splitserve.router.app
    from splitserve.cluster import serve

    config = parse_cluster_config({"name": "failed-start", "model": {"path": "m"}, "redis_url": redis_url, "router": {"http_port": 0, "grpc_port": 0}})
    backends: list[FakeBackend] = []
    monkeypatch.setattr(serve, "RayBackend", lambda *a, **k: backends.append(FakeBackend(Registry(redis_url, config.name))) or backends[-1])
    monkeypatch.setattr(FakeBackend, "shutdown", lambda self: self.workers.clear(), raising=False)

    def router(*a, **k):
        raise OSError("router did not start: port taken")

    monkeypatch.setattr(splitserve.router.app, "Router", router)
    with pytest.raises(OSError, match="port taken"):
        serve.start_cluster(config, embedded_redis=False, fresh=True)
    assert not [t for t in threading.enumerate() if t.name == "controller" and t.is_alive()]
