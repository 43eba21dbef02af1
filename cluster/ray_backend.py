"""Every Ray call splitserve makes is in this file: pools place and supervise worker
processes through `RayBackend`, and tests can swap in any object with the same methods.

Ray places and restarts processes; it carries no tokens or KV (those go over gRPC and
torch.distributed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Protocol

from splitserve.cluster.config import Resources
from splitserve.cluster.worker_runtime import WorkerSpec

logger = logging.getLogger(__name__)
CONNECT_RETRY_SECONDS = 2.0


def ray_options(resources: Resources) -> dict:
    """What one worker (one CP rank) asks Ray for; custom resources pin it to its pool's nodes."""
    options: dict = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    if resources.custom:
        options["resources"] = dict(resources.custom)
    return options


def bundle(resources: Resources) -> dict[str, float]:
    """One CP rank's placement-group bundle: the same asks, so the group lands where its ranks may run."""
    out = {"CPU": resources.num_cpus, **resources.custom}
    if resources.num_gpus:
        out["GPU"] = resources.num_gpus
    return out


class WorkerBackend(Protocol):
    def start(self, spec: WorkerSpec, resources: Resources) -> None: ...

    def stop(self, worker_id: str) -> None: ...

    def alive(self) -> dict[str, str]:
        """worker id -> role of every worker this backend has started and not stopped."""

    def dead(self, worker_ids: list[str]) -> list[str]:
        """Of these workers, those whose process is gone for good (no restart is coming)."""

    def adopt(self) -> list[WorkerSpec]:
        """Take over the workers an earlier controller left running (see RayBackend.adopt)."""

    def shutdown(self, keep_workers: bool = False) -> None: ...


class WorkerActor:
    """The body of a worker's Ray actor: builds a `WorkerRuntime` in the actor's process.
    On a restart after a crash Ray runs __init__ again, and the worker re-registers."""

    def __init__(self, spec_json: str) -> None:
        import ray

        from splitserve.cluster.worker_runtime import WorkerRuntime

        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.spec_json = spec_json
        spec = WorkerSpec(**json.loads(spec_json))
        if not spec.host:  # on a multi-node cluster: the address Ray knows this node by, which peers can reach
            spec = dataclasses.replace(spec, host=ray.util.get_node_ip_address())
        self.runtime = WorkerRuntime(spec, restarts=int(restarted))

    def info(self) -> dict:
        return self.runtime.info()

    def spec(self) -> str:
        """The spec it was started with, for a controller that adopts it."""
        return self.spec_json

    def stop(self) -> None:
        self.runtime.stop()


class CPRankActor:
    """Rank r > 0 of a context-parallel prefill group, in bundle r of the group's placement
    group: finds rank 0's rendezvous in Redis, joins, and runs the group's jobs."""

    def __init__(self, spec_json: str, rank: int) -> None:
        import threading

        from splitserve.cluster.registry import Registry
        from splitserve.prefill_worker.cp import CPRank

        spec = WorkerSpec(**json.loads(spec_json))
        store = Registry(spec.redis_url, spec.cluster).cp_store(spec.worker_id)
        self.rank = CPRank(spec.model, rank=rank, world=spec.cp_degree, store=store, block_size=spec.block_size,
                           sender_id=spec.worker_id, dtype=spec.dtype, device=spec.device, token=spec.token, tls=spec.tls,
                           linear_kernel=spec.linear_kernel, num_threads=spec.num_threads)
        self.thread = threading.Thread(target=self.rank.follow, name=f"cp-rank{rank}", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()


def connect(ray, address: str | None, timeout: float, **init_kwargs) -> None:
    """`ray.init`, retried while an existing cluster is not reachable yet: on Kubernetes the
    controller's pod may start before the Ray head's, or reach its client server while it is busy."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.init(address=address, **init_kwargs)
            return
        except ConnectionError as e:
            if address is None or time.monotonic() > deadline:
                raise
            logger.warning("Ray at %s is not reachable yet (%s); retrying", address, str(e).splitlines()[0] if str(e) else type(e).__name__)
            ray.shutdown()  # a half-made connection must not make the next init a no-op
            time.sleep(CONNECT_RETRY_SECONDS)


def follower_name(worker_id: str, rank: int) -> str:
    return f"{worker_id}/rank{rank}"  # worker ids have no '/' (cluster names are [A-Za-z0-9_-])


class RayBackend:
    """`detached`: the workers outlive this backend's process (Ray's detached actors, on an
    existing Ray cluster), so that a controller that stops or crashes does not take the
    serving workers with it; the next one adopts them (`adopt`)."""

    def __init__(self, address: str | None, namespace: str, *, num_cpus: int | None = None, max_restarts: int = 5, start_timeout: float = 300.0,
                 detached: bool = False) -> None:
        import ray

        self._ray = ray
        self._detached = detached
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            connect(ray, address, start_timeout, namespace=namespace, num_cpus=num_cpus, include_dashboard=False,
                    logging_level=logging.WARNING, log_to_driver=False)
        self._actor_cls = ray.remote(WorkerActor)
        self._rank_cls = ray.remote(CPRankActor)
        self._groups: dict[str, tuple[object, list]] = {}
        self._max_restarts = max_restarts
        self._start_timeout = start_timeout
        self._actors: dict[str, tuple[str, object]] = {}
        self._pings: dict[str, object] = {}  # worker id -> a pending liveness call

    def start(self, spec: WorkerSpec, resources: Resources) -> None:
        """Start a worker and wait until it serves. A context-parallel prefill group gets a
        placement group of one bundle per rank, packed on one node: rank 0 (the worker
        proper) in bundle 0, ranks 1..N-1 as `CPRankActor`s in the others."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group, followers = None, []
        options = ray_options(resources)
        lifetime = {"lifetime": "detached"} if self._detached else {}
        if spec.role == "prefill" and spec.cp_degree > 1:
            group = placement_group([bundle(resources)] * spec.cp_degree, strategy="STRICT_PACK", name=f"{spec.worker_id}-cp", **lifetime)
            self._ray.get(group.ready(), timeout=self._start_timeout)
            spec = dataclasses.replace(spec, cp_followers="placed")
            placed = lambda i: PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)  # noqa: E731
            # a lost rank breaks the group for good: rank 0 reports it broken and the controller replaces the group
            followers = [self._rank_cls.options(scheduling_strategy=placed(r), max_restarts=0, name=follower_name(spec.worker_id, r), **lifetime,
                                                **options).remote(spec.to_json(), r)
                         for r in range(1, spec.cp_degree)]
            options["scheduling_strategy"] = placed(0)
        actor = self._actor_cls.options(
            name=spec.worker_id,
            max_restarts=0 if group else self._max_restarts,
            max_concurrency=4,  # info/stop calls must not queue behind a slow __init__ forever
            **lifetime,
            **options,
        ).remote(spec.to_json())
        self._actors[spec.worker_id] = (spec.role, actor)
        self._groups[spec.worker_id] = (group, followers)
        try:
            self._ray.get(actor.info.remote(), timeout=self._start_timeout)
        except Exception:
            self.stop(spec.worker_id)
            raise

    def stop(self, worker_id: str) -> None:
        entry = self._actors.pop(worker_id, None)
        self._pings.pop(worker_id, None)
        if entry is None:
            return
        _, actor = entry
        try:
            self._ray.get(actor.stop.remote(), timeout=30)
        except Exception as e:  # dead or hung: kill it regardless
            logger.warning("worker %s did not stop cleanly: %s", worker_id, e)
        self._ray.kill(actor, no_restart=True)
        group, followers = self._groups.pop(worker_id, (None, []))
        for f in followers:
            self._ray.kill(f, no_restart=True)
        if group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)

    def alive(self) -> dict[str, str]:
        return {wid: role for wid, (role, _) in self._actors.items()}

    def dead(self, worker_ids: list[str]) -> list[str]:
        """A call to a restarting actor waits for it; to an actor Ray gave up on, it fails at
        once with ActorDiedError. So: ping, and call dead only those whose ping failed so."""
        from ray.exceptions import ActorDiedError

        for wid in worker_ids:
            if wid in self._actors and wid not in self._pings:
                self._pings[wid] = self._actors[wid][1].info.remote()
        refs = {ref: wid for wid, ref in self._pings.items()}
        ready, _ = self._ray.wait(list(refs), num_returns=len(refs), timeout=0.2) if refs else ([], [])
        dead = []
        for ref in ready:
            wid = refs[ref]
            del self._pings[wid]
            try:
                self._ray.get(ref)
            except ActorDiedError:
                dead.append(wid)
            except Exception as e:  # busy, restarting: ask again next time
                logger.debug("liveness of %s: %s", wid, e)
        return dead

    def adopt(self) -> list[WorkerSpec]:
        """Take over the workers of this namespace that an earlier controller left running
        (detached ones; after a restart, an upgrade, a crash); their specs as started. One that
        does not answer within the start timeout is stopped: the controller replaces it."""
        from ray.util import list_named_actors

        names = [n for n in list_named_actors() if n not in self._actors]
        adopted = []
        for name in [n for n in names if "/" not in n]:  # a CP group's followers come with their rank 0
            actor = self._ray.get_actor(name)
            self._groups[name] = (self._placement_group(f"{name}-cp"), [self._ray.get_actor(n) for n in names if n.startswith(name + "/")])
            try:
                spec = WorkerSpec(**json.loads(self._ray.get(actor.spec.remote(), timeout=self._start_timeout)))
            except Exception as e:
                logger.warning("worker %s left by an earlier controller does not answer (%s): stopping it", name, str(e).splitlines()[0][:200])
                self._actors[name] = ("", actor)
                self.stop(name)
                continue
            self._actors[name] = (spec.role, actor)
            adopted.append(spec)
        return adopted

    @staticmethod
    def _placement_group(name: str):
        from ray.util.placement_group import get_placement_group

        try:
            return get_placement_group(name)
        except ValueError:  # none by that name: not a CP group
            return None

    def shutdown(self, keep_workers: bool = False) -> None:
        """Stop every worker (with `keep_workers`: leave them to the next controller), then
        Ray if this backend started it."""
        if not keep_workers:
            for wid in list(self._actors):
                self.stop(wid)
        if self._owns_ray:
            self._ray.shutdown()
