"""Running a cluster from this process: `splitserve serve` (everything embedded: Redis, a local
Ray, the pools and the router) and `splitserve up` (an existing Ray cluster and Redis; with
`--no-router` only the controller, as the Helm chart runs it, its routers being separate).

Life cycle: start Redis if needed -> Ray -> controller (starts the pools, then keeps them at
their targets) -> router -> print the ready line -> wait for SIGINT/SIGTERM -> stop the router,
the controller and every worker, Ray and Redis, in that order. With `up --keep-workers` (as the
Helm chart runs the controller) the workers are left serving instead, and the next controller
adopts them: a controller's restart, upgrade or crash is not an outage.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

from splitserve.cluster.config import ClusterConfig, ConfigError
from splitserve.cluster.controller import Controller
from splitserve.cluster.net import check_port_free
from splitserve.cluster.ray_backend import RayBackend
from splitserve.cluster.redis_server import EmbeddedRedis
from splitserve.cluster.registry import Registry

logger = logging.getLogger(__name__)


def resolve_device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Running:
    config: ClusterConfig
    redis: EmbeddedRedis | None
    backend: RayBackend
    controller: Controller
    router: object | None  # None: `splitserve up --no-router` (routers run as their own processes)
    keep_workers: bool = False  # the workers outlive this process (detached), for the next controller
    adopted: tuple[str, ...] = ()  # the workers an earlier controller left, serving on

    def stop(self) -> None:
        steps = [("controller", self.controller.stop), ("workers and Ray", lambda: self.backend.shutdown(self.keep_workers))]
        if self.router is not None:
            steps.insert(0, ("router", self.router.stop))
        for step, fn in steps:
            try:
                fn()
            except Exception as e:  # keep shutting the rest down
                logger.warning("stopping %s: %s", step, e)
        if self.redis is not None:
            self.redis.stop()


def start_cluster(config: ClusterConfig, *, embedded_redis: bool, fresh: bool, with_router: bool = True, keep_workers: bool = False) -> Running:
    """`keep_workers`: the workers are detached and outlive this process (needs an existing
    Ray cluster, `ray_address`); this controller adopts those an earlier one left running."""
    if keep_workers and not config.ray_address:
        raise ConfigError("ray_address", "keeping the workers past the controller needs an existing Ray cluster (a local Ray ends with this process)")
    if with_router:
        check_port_free(config.router.host, config.router.http_port, "router.http_port")
        check_port_free(config.router.host, config.router.grpc_port, "router.grpc_port")
    redis_server = EmbeddedRedis() if embedded_redis else None  # loopback, with a generated password
    if redis_server is not None:
        redis_server.supervise()  # restarted if it dies: the run survives as it would a Redis restart
    redis_url = redis_server.url if redis_server else config.redis_url
    if not redis_url:
        raise ValueError("redis_url: required by `splitserve up` (an existing Redis); `splitserve serve` starts its own")
    backend = controller = None
    try:
        registry = Registry(redis_url, config.name, config.heartbeat_ttl_seconds)
        registry.redis.ping()  # an unreachable Redis is said now, before Ray starts
        if fresh:
            registry.clear()  # a new run: no stale targets or workers from an earlier one
        workers = config.prefill.replicas + config.decode.replicas
        backend = RayBackend(config.ray_address, f"splitserve-{config.name}", num_cpus=None if config.ray_address else max(4, 2 * workers),
                             max_restarts=config.max_restarts, detached=keep_workers)
        controller = Controller(config, backend, registry, redis_url, resolve_device(config.model.device))
        adopted = controller.adopt() if keep_workers else []
        controller.reconcile()  # the first pools, before the router takes traffic
        controller.start()
        router = None
        if with_router:
            from splitserve.router.app import Router

            router = Router(config, redis_url)
    except BaseException:
        if controller is not None:  # first: its loop would start workers (and a local Ray) again
            controller.stop()
        if backend is not None:
            backend.shutdown()
        if redis_server is not None:
            redis_server.stop()
        raise
    return Running(config, redis_server, backend, controller, router, keep_workers, tuple(adopted))


def wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
