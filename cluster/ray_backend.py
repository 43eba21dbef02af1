"""Every Ray call splitserve makes is in this file: pools place and supervise worker
processes through `RayBackend`, and tests can swap in any object with the same methods.

Ray places and restarts processes; it carries no tokens or KV (those go over gRPC and
torch.distributed).
"""

from __future__ import annotations

import json
import logging
from typing import Protocol

from cluster.config import Resources
from cluster.worker_runtime import WorkerSpec

logger = logging.getLogger(__name__)


class WorkerBackend(Protocol):
    def start(self, spec: WorkerSpec, resources: Resources) -> None: ...

    def stop(self, worker_id: str) -> None: ...

    def alive(self) -> dict[str, str]:
        """worker id -> role of every worker this backend has started and not stopped."""

    def shutdown(self) -> None: ...


class WorkerActor:
    """The body of a worker's Ray actor: builds a `WorkerRuntime` in the actor's process.
    On a restart after a crash Ray runs __init__ again, and the worker re-registers."""

    def __init__(self, spec_json: str) -> None:
        import ray

        from cluster.worker_runtime import WorkerRuntime

        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.runtime = WorkerRuntime(WorkerSpec(**json.loads(spec_json)), restarts=int(restarted))

    def info(self) -> dict:
        return self.runtime.info()

    def stop(self) -> None:
        self.runtime.stop()


class RayBackend:
    def __init__(self, address: str | None, namespace: str, *, num_cpus: int | None = None, max_restarts: int = 5, start_timeout: float = 300.0) -> None:
        import ray

        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, namespace=namespace, num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        self._actor_cls = ray.remote(WorkerActor)
        self._max_restarts = max_restarts
        self._start_timeout = start_timeout
        self._actors: dict[str, tuple[str, object]] = {}

    def start(self, spec: WorkerSpec, resources: Resources) -> None:
        actor = self._actor_cls.options(
            name=spec.worker_id,
            max_restarts=self._max_restarts,
            max_concurrency=4,  # info/stop calls must not queue behind a slow __init__ forever
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
        ).remote(spec.to_json())
        self._actors[spec.worker_id] = (spec.role, actor)
        try:
            self._ray.get(actor.info.remote(), timeout=self._start_timeout)
        except Exception:
            self._actors.pop(spec.worker_id, None)
            self._ray.kill(actor, no_restart=True)
            raise

    def stop(self, worker_id: str) -> None:
        entry = self._actors.pop(worker_id, None)
        if entry is None:
            return
        _, actor = entry
        try:
            self._ray.get(actor.stop.remote(), timeout=30)
        except Exception as e:  # dead or hung: kill it regardless
            logger.warning("worker %s did not stop cleanly: %s", worker_id, e)
        self._ray.kill(actor, no_restart=True)

    def alive(self) -> dict[str, str]:
        return {wid: role for wid, (role, _) in self._actors.items()}

    def shutdown(self) -> None:
        for wid in list(self._actors):
            self.stop(wid)
        if self._owns_ray:
            self._ray.shutdown()
