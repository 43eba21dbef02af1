"""Routing policies: pure functions of a cluster snapshot and a request, plain Python.

Every policy implements `RoutingPolicy.choose` and returns a `Route`, so benchmarks compare
them on identical traces:
    round_robin     each pool in turn
    least_loaded    fewest queued prompt tokens / fewest decodes in flight
    workload_aware  the pair with the least work for this request, knowing which worker caches
                    which prefix (the router's PrefixIndex), and the decode worker alone when it
                    lacks at most `local_prefill_tokens` of the prompt (selective
                    disaggregation); a bounded-load cap keeps any worker from taking much more
                    than its share of recent requests, so a prompt shared by every request
                    cannot pull them all onto one worker.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


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
    inflight_blocks: int = 0


@dataclass(frozen=True)
class Snapshot:
    """The ready workers as last reported, plus this router's fresh view of those it has
    requests on (`inflight`: the same worker with its in-flight counts filled in). Each pool
    is ordered by reported load, lightest first, so a policy can look at a few workers of a
    large pool instead of all of them."""

    prefill: tuple[WorkerLoad, ...] = ()
    decode: tuple[WorkerLoad, ...] = ()
    inflight: Mapping[str, WorkerLoad] = field(default_factory=dict)
    workers_by_id: Mapping[str, WorkerLoad] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, workers: Iterable[WorkerLoad]) -> "Snapshot":
        workers = list(workers)
        prefill = sorted((w for w in workers if w.role == "prefill"), key=lambda w: w.queued_prefill_tokens)
        decode = sorted((w for w in workers if w.role == "decode"), key=lambda w: w.used_blocks + w.reserved_blocks)
        return cls(tuple(prefill), tuple(decode), {}, {w.worker_id: w for w in workers})

    def with_inflight(self, counts: Mapping[str, tuple[int, int, int]]) -> "Snapshot":
        """This snapshot plus this router's (requests, prompt tokens, blocks) per worker."""
        by_id = self.by_id
        fresh = {wid: dataclasses.replace(by_id[wid], inflight=r, inflight_prompt_tokens=t, inflight_blocks=b)
                 for wid, (r, t, b) in counts.items() if wid in by_id}
        return Snapshot(self.prefill, self.decode, fresh, by_id)

    @property
    def by_id(self) -> Mapping[str, WorkerLoad]:
        if self.workers_by_id is not None:
            return self.workers_by_id
        return {w.worker_id: w for pool in (self.prefill, self.decode) for w in pool}

    def load(self, w: WorkerLoad) -> WorkerLoad:
        """`w` with this router's in-flight counts."""
        return self.inflight.get(w.worker_id, w)

    def pool(self, role: str) -> tuple[WorkerLoad, ...]:
        return self.prefill if role == "prefill" else self.decode


@dataclass(frozen=True)
class RouteRequest:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    exclude: frozenset[str] = field(default_factory=frozenset)  # workers that failed this request
    block_hashes: tuple[int, ...] = ()  # of the prompt's full blocks, as workers compute them
    block_size: int = 16


@dataclass(frozen=True)
class Route:
    decode: WorkerLoad
    prefill: WorkerLoad | None = None  # None: the decode worker prefills the prompt itself
    prefill_cached_blocks: int = 0  # the chosen workers' cached prefix, as the index believes
    decode_cached_blocks: int = 0

    @property
    def path(self) -> str:
        return "local" if self.prefill is None else "disaggregated"


class NoWorkerError(Exception):
    status = "UNAVAILABLE"


class PrefixLookup(Protocol):
    def match(self, block_hashes: Sequence[int]) -> dict[str, int]: ...


class RoutingPolicy(abc.ABC):
    name = "abstract"

    @abc.abstractmethod
    def choose(self, snapshot: Snapshot, request: RouteRequest) -> Route:
        """Where the request goes; NoWorkerError if a pool has no usable worker."""

    @staticmethod
    def candidates(snapshot: Snapshot, request: RouteRequest, role: str) -> list[WorkerLoad]:
        """The pool's workers this request may use, lightest reported load first."""
        pool = snapshot.pool(role)
        left = [w for w in pool if w.worker_id not in request.exclude] if request.exclude else list(pool)
        if not left:
            raise NoWorkerError(f"every {role} worker already failed this request" if pool else f"no {role} worker is ready")
        return left


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, snapshot: Snapshot, request: RouteRequest) -> Route:
        p, d = self.candidates(snapshot, request, "prefill"), self.candidates(snapshot, request, "decode")
        i = next(self._counter)
        return Route(decode=d[i % len(d)], prefill=p[i % len(p)])


class LeastLoaded(RoutingPolicy):
    """Prefill: fewest prompt tokens waiting (this router's in-flight prompts, then the queue
    the worker last reported). Decode: fewest requests in flight, then fewest used + reserved
    blocks. The router's own counts come first because heartbeats lag a burst by up to a
    second. Ties go round-robin so equal workers share the load."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, snapshot: Snapshot, request: RouteRequest) -> Route:
        p = [snapshot.load(w) for w in self.candidates(snapshot, request, "prefill")]
        d = [snapshot.load(w) for w in self.candidates(snapshot, request, "decode")]
        i = next(self._counter)
        best_p = min(range(len(p)), key=lambda k: (p[k].inflight_prompt_tokens, p[k].queued_prefill_tokens, (k - i) % len(p)))
        best_d = min(range(len(d)), key=lambda k: (d[k].inflight, d[k].used_blocks + d[k].reserved_blocks, (k - i) % len(d)))
        return Route(decode=d[best_d], prefill=p[best_p])


class _BoundedLoad:
    """At most `factor` x an equal share of the last `window` picks per worker: the cap that
    keeps cache affinity from becoming a hotspot (bounded-load hashing's rule, over recent
    requests). Whatever the costs say, a worker at its cap waits for the others to catch up."""

    def __init__(self, factor: float, window: int) -> None:
        self.factor = factor
        self.recent: deque[str] = deque(maxlen=window)
        self.counts: Counter[str] = Counter()

    def allows(self, worker_id: str, pool_size: int) -> bool:
        cap = math.ceil(self.factor * (len(self.recent) + 1) / pool_size)
        return self.counts[worker_id] + 1 <= cap

    def record(self, worker_id: str) -> None:
        if len(self.recent) == self.recent.maxlen:
            self.counts[self.recent[0]] -= 1
        self.recent.append(worker_id)
        self.counts[worker_id] += 1


class WorkloadAware(RoutingPolicy):
    """The pair that does the least work for this request.

    prefill cost (tokens) = prompt tokens queued on the worker + this prompt's tokens it has
                            not cached: the compute ahead of this request's first token
    decode cost (blocks)  = the prompt blocks the worker would have to receive, plus a small
                            weight on the KV blocks it already holds active: moving KV is the
                            request's own cost; a busier decode batch slows every token a
                            little, and the bounded-load cap keeps the batches even
    Both sides pass the bounded-load cap. When the chosen decode worker lacks at most
    `local_prefill_tokens` of the prompt, has the room, and has no more than that much prefill
    work waiting already, it prefills that part itself and no prefill worker is used."""

    name = "workload_aware"
    DECODE_LOAD_WEIGHT = 0.1  # an active block costs a tenth of a block to receive

    def __init__(self, index: PrefixLookup | None = None, *, local_prefill_tokens: int = 0, balance_factor: float = 1.15,
                 balance_window: int = 64, candidates_per_pool: int = 8) -> None:
        self.index = index
        self.local_prefill_tokens = local_prefill_tokens
        self.top = candidates_per_pool
        self.balance = {"prefill": _BoundedLoad(balance_factor, balance_window), "decode": _BoundedLoad(balance_factor, balance_window)}

    def choose(self, snapshot: Snapshot, request: RouteRequest) -> Route:
        matched = self.index.match(request.block_hashes) if self.index is not None and request.block_hashes else {}
        bs, n = request.block_size, request.num_prompt_tokens
        blocks = -(-n // bs)

        def room(w: WorkerLoad) -> bool:  # for the blocks it lacks (a full worker would preempt or refuse)
            return w.free_blocks - w.inflight_blocks >= blocks - matched.get(w.worker_id, 0)

        def decode_cost(w: WorkerLoad) -> float:
            active = w.used_blocks + w.reserved_blocks + w.inflight_blocks
            return blocks - matched.get(w.worker_id, 0) + self.DECODE_LOAD_WEIGHT * active

        def prefill_cost(w: WorkerLoad) -> float:
            return w.queued_prefill_tokens + w.inflight_prompt_tokens + n - matched.get(w.worker_id, 0) * bs

        d = self._pick(snapshot, request, "decode", matched, decode_cost, room)
        self.balance["decode"].record(d.worker_id)
        d_cached = min(matched.get(d.worker_id, 0), blocks)
        missing = n - d_cached * bs
        backlog = d.queued_prefill_tokens + d.inflight_prompt_tokens
        if missing <= self.local_prefill_tokens and backlog + missing <= 2 * self.local_prefill_tokens and room(d):
            return Route(decode=d, prefill=None, decode_cached_blocks=d_cached)
        p = self._pick(snapshot, request, "prefill", matched, prefill_cost, room)
        self.balance["prefill"].record(p.worker_id)
        return Route(decode=d, prefill=p, prefill_cached_blocks=matched.get(p.worker_id, 0), decode_cached_blocks=d_cached)

    def _pick(self, snapshot: Snapshot, request: RouteRequest, role: str, matched: dict[str, int], cost, room) -> WorkerLoad:
        """The cheapest worker with room and within its cap, among the few that can be cheapest:
        the least loaded as reported, those caching a prefix of the prompt, and those this
        router has requests on (their load moved since the report). Costs only grow with load
        and shrink with cached blocks, so no other worker can win."""
        pool = self.candidates(snapshot, request, role)
        size = len(pool)
        if size > self.top:
            by_id = snapshot.by_id
            extra = (by_id[i] for i in {*matched, *snapshot.inflight} if i in by_id and i not in request.exclude)
            pool = list({w.worker_id: w for w in [*pool[: self.top], *(w for w in extra if w.role == role)]}.values())
        pool = [snapshot.load(w) for w in pool]
        pool = [w for w in pool if room(w)] or pool
        cap = self.balance[role]
        allowed = [w for w in pool if cap.allows(w.worker_id, size)] or pool
        # equal costs go to the worker with fewer recent requests, then fewer in flight
        return min(allowed, key=lambda w: (cost(w), cap.counts[w.worker_id], w.inflight))


POLICIES: dict[str, type[RoutingPolicy]] = {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "workload_aware": WorkloadAware}


def make_policy(name: str, **options) -> RoutingPolicy:
    """`options` go to policies that take them (workload_aware: index, local_prefill_tokens,
    balance_factor, balance_window)."""
    if name not in POLICIES:
        raise ValueError(f"routing policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name](**options) if name == "workload_aware" else POLICIES[name]()
