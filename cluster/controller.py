"""The controller: a reconcile loop that makes the running pools match the targets in Redis.

Each pass (idempotent): stop workers that finished draining; then, per role, start workers
while fewer than the target are serving, or ask the newest to drain while more are. Users
change targets with `splitserve scale` / `drain` (through the router's admin service); the
controller only ever compares and acts.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable

from splitserve.cluster.config import ClusterConfig, Resources
from splitserve.cluster.ray_backend import WorkerBackend
from splitserve.cluster.registry import Registry
from splitserve.cluster.worker_runtime import WorkerSpec

logger = logging.getLogger(__name__)
ROLES = ("prefill", "decode")


def worker_spec(config: ClusterConfig, role: str, worker_id: str, redis_url: str, device: str) -> WorkerSpec:
    pool = config.prefill if role == "prefill" else config.decode
    return WorkerSpec(
        role=role, worker_id=worker_id, cluster=config.name, redis_url=redis_url, model=config.model.path,
        dtype=config.model.dtype, device=device, block_size=config.block_size, kv_cache_memory=pool.kv_cache_memory,
        max_model_len=config.model.max_model_len, linear_kernel=config.model.linear_kernel, attention_backend=config.model.attention_backend,
        max_num_seqs=config.decode.max_running_requests if role == "decode" else 256,
        max_num_batched_tokens=config.prefill.max_num_batched_tokens,
        # decode workers chunk their own prefills too (a short tail, a colocated request, a
        # preempted request's recompute) so that running decodes keep stepping
        max_prefill_chunk=config.prefill.max_prefill_chunk,
        transport=config.kv_transfer.transport, lease_seconds=config.kv_transfer.lease_seconds,
        host=config.router.host if config.router.host in ("127.0.0.1", "localhost", "::1") else "", token=config.cluster_token, tls=config.tls,
        heartbeat_seconds=config.heartbeat_seconds, heartbeat_ttl_seconds=config.heartbeat_ttl_seconds,
        cp_degree=config.prefill.cp_degree if role == "prefill" else 1,
        port=pool.port, kv_port=config.decode.kv_port if role == "decode" else None,
    )


class Controller:
    def __init__(self, config: ClusterConfig, backend: WorkerBackend, registry: Registry, redis_url: str, device: str = "cpu",
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.config = config
        self.backend = backend
        self.registry = registry
        self.redis_url = redis_url
        self.device = device
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._targets = {"prefill": 0 if config.colocated else config.prefill.replicas, "decode": config.decode.replicas}
        registry.declare_targets(self._targets)

    def resources(self, role: str) -> Resources:
        """What one worker (one rank of a CP group) asks Ray for."""
        r = (self.config.prefill if role == "prefill" else self.config.decode).resources
        return dataclasses.replace(r, num_gpus=r.num_gpus or (1.0 if self.device == "cuda" else 0.0))  # a GPU worker asks for its GPU

    def adopt(self) -> list[str]:
        """Take over the workers an earlier controller left running (detached workers; see
        RayBackend). Those started with the settings this controller would start them with
        serve on; those whose settings cluster.yaml has since changed (model, pool sizes of
        their caches, token, ...) are stopped, and replaced by the next reconcile. The ids adopted."""
        adopted = []
        for spec in self.backend.adopt():
            want = worker_spec(self.config, spec.role, spec.worker_id, self.redis_url, self.device)
            changed = [f.name for f in dataclasses.fields(want) if f.name != "cp_followers" and getattr(spec, f.name) != getattr(want, f.name)]
            if not changed:
                adopted.append(spec.worker_id)
                continue
            logger.warning("replacing %s worker %s: cluster.yaml changed its %s", spec.role, spec.worker_id, ", ".join(changed))
            self.backend.stop(spec.worker_id)
            self.registry.forget(spec.worker_id)
        return adopted

    def reconcile(self) -> None:
        alive = self.backend.alive()
        records = {r.worker_id: r for r in self.registry.workers()}
        draining = self.registry.draining()
        for wid in [w for w in alive if records.get(w) is not None and records[w].state in ("drained", "broken")]:
            logger.info("stopping %s worker %s", records[wid].state, wid)
            self.backend.stop(wid)
            self.registry.forget(wid)
            del alive[wid]
        # a worker silent in the registry whose process Ray will not restart (its restarts are
        # used up) is stopped for good here, and replaced below like any missing worker
        for wid in self.backend.dead([w for w in alive if w not in records]):
            logger.warning("worker %s died and Ray will not restart it (its restarts used up, or a context-parallel group, "
                           "which is replaced whole): replacing it", wid)
            self.backend.stop(wid)
            self.registry.forget(wid)
            del alive[wid]
        targets = self.registry.targets()
        if any(role not in targets for role in ROLES):  # Redis lost its data (restart): restore
            self.registry.init_targets(self._targets)
            targets = {**self._targets, **targets}
        self._targets = targets
        for role in ROLES:
            serving = [w for w, r in alive.items() if r == role and w not in draining]  # oldest first
            want = targets.get(role, 0)
            for _ in range(want - len(serving)):
                wid = f"{self.config.name}-{role}-{uuid.uuid4().hex[:6]}"
                logger.info("starting %s worker %s", role, wid)
                self.backend.start(worker_spec(self.config, role, wid, self.redis_url, self.device), self.resources(role))
            for wid in serving[want:]:
                logger.info("draining %s worker %s (scale down)", role, wid)
                self.registry.request_drain(wid)

    def start(self, period: float = 0.5) -> None:
        self._thread = threading.Thread(target=self._run, args=(period,), name="controller", daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.reconcile()
            except Exception as e:  # keep reconciling: Redis or Ray may be back next pass
                logger.warning("reconcile failed: %s", e)
                if self._on_error is not None:
                    self._on_error(e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

