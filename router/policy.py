"""Routing policies: pure functions of a cluster snapshot and a request, plain Python.

Every policy implements `RoutingPolicy.choose`, so benchmarks can compare them on identical
traces. Round-robin and least-loaded ship here; the workload-aware policy is added the same way.
"""

from __future__ import annotations

import abc
import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    role: str
    address: str
    queued_prefill_tokens: int = 0
    running: int = 0
    used_blocks: int = 0
    reserved_blocks: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    # this router's own count of its requests on the worker (fresh, unlike the heartbeat's)
    inflight: int = 0
    inflight_prompt_tokens: int = 0


@dataclass(frozen=True)
class Snapshot:
    prefill: tuple[WorkerLoad, ...] = ()
    decode: tuple[WorkerLoad, ...] = ()


@dataclass(frozen=True)
class RouteRequest:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    exclude: frozenset[str] = field(default_factory=frozenset)  # workers that failed this request


class NoWorkerError(Exception):
    status = "UNAVAILABLE"


class RoutingPolicy(abc.ABC):
    name = "abstract"

    @abc.abstractmethod
    def choose(self, snapshot: Snapshot, request: RouteRequest) -> tuple[WorkerLoad, WorkerLoad]:
        """(prefill worker, decode worker) for the request; NoWorkerError if a pool is empty."""

    @staticmethod
    def candidates(snapshot: Snapshot, request: RouteRequest) -> tuple[list[WorkerLoad], list[WorkerLoad]]:
        p = [w for w in snapshot.prefill if w.worker_id not in request.exclude]
        d = [w for w in snapshot.decode if w.worker_id not in request.exclude]
        for role, pool, left in (("prefill", snapshot.prefill, p), ("decode", snapshot.decode, d)):
            if not left:
                raise NoWorkerError(f"every {role} worker already failed this request" if pool else f"no {role} worker is ready")
        return p, d


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, snapshot: Snapshot, request: RouteRequest) -> tuple[WorkerLoad, WorkerLoad]:
        p, d = self.candidates(snapshot, request)
        i = next(self._counter)
        return p[i % len(p)], d[i % len(d)]


class LeastLoaded(RoutingPolicy):
    """Prefill: fewest prompt tokens waiting (this router's in-flight prompts, then the queue
    the worker last reported). Decode: fewest requests in flight, then fewest used + reserved
    blocks. The router's own counts come first because heartbeats lag a burst by up to a
    second. Ties go round-robin so equal workers share the load."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, snapshot: Snapshot, request: RouteRequest) -> tuple[WorkerLoad, WorkerLoad]:
        p, d = self.candidates(snapshot, request)
        i = next(self._counter)
        best_p = min(range(len(p)), key=lambda k: (p[k].inflight_prompt_tokens, p[k].queued_prefill_tokens, (k - i) % len(p)))
        best_d = min(range(len(d)), key=lambda k: (d[k].inflight, d[k].used_blocks + d[k].reserved_blocks, (k - i) % len(d)))
        return p[best_p], d[best_d]


POLICIES: dict[str, type[RoutingPolicy]] = {"round_robin": RoundRobin, "least_loaded": LeastLoaded}


def make_policy(name: str) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"routing policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name]()
