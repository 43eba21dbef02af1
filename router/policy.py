"""Routing policies: pure functions of a cluster snapshot and a request, plain Python.

Every policy implements `RoutingPolicy.choose` and returns a `Route`, so benchmarks compare
them on identical traces:
    round_robin     each pool in turn
    least_loaded    fewest queued prompt tokens / fewest decodes in flight
    workload_aware  predicts each candidate pair's TTFT (queue wait, the compute for the tokens
                    the prefill worker has not cached, the KV the decode worker lacks) from
                    what the router learned (router/predictors.py) and which worker caches
                    which prefix (the PrefixIndex); places decodes by KV headroom for the
                    prompt plus the predicted output and by the heavy/light mix (TetriInfer);
                    lets a decode worker prefill a short uncached tail itself (selective
                    disaggregation); a bounded-load cap keeps any worker from taking much more
                    than its share of recent requests, so a prompt shared by every request
                    cannot pull them all onto one worker (a prefix only one conversation
                    uses may exceed it, up to 1.5x the share).
In a colocated cluster (no prefill pool) every route is local: the decode worker prefills.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import math
import random
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from splitserve.proto.status import StatusError
from splitserve.router.predictors import OutputLengthModel, PrefillModel, RequestFeatures, TransferModel


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
    # requests the routers sent the worker and have not seen finish (this router's own counts
    # are fresh; other routers' are as fresh as their last publication, a fraction of a second)
    inflight: int = 0
    inflight_prompt_tokens: int = 0  # prompt tokens still to compute for those requests
    inflight_blocks: int = 0  # KV blocks they are about to take
    inflight_heavy: int = 0  # of those requests, the ones predicted to generate long outputs


Inflight = tuple[int, int, int, int]  # (requests, prompt tokens, blocks, heavy)


@dataclass(frozen=True)
class Snapshot:
    """The ready workers as last reported, plus this router's fresh view of those it has
    requests on (`inflight`: the same worker with its in-flight counts added). Each pool is
    ordered by reported load, lightest first, so a policy can look at a few workers of a large
    pool instead of all of them."""

    prefill: tuple[WorkerLoad, ...] = ()
    decode: tuple[WorkerLoad, ...] = ()
    inflight: Mapping[str, WorkerLoad] = field(default_factory=dict)
    workers_by_id: Mapping[str, WorkerLoad] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, workers: Iterable[WorkerLoad]) -> "Snapshot":
        workers = list(workers)
        prefill = sorted((w for w in workers if w.role == "prefill"), key=lambda w: w.queued_prefill_tokens + w.inflight_prompt_tokens)
        decode = sorted((w for w in workers if w.role == "decode"), key=lambda w: w.used_blocks + w.reserved_blocks + w.inflight_blocks)
        return cls(tuple(prefill), tuple(decode), {}, {w.worker_id: w for w in workers})

    def with_inflight(self, counts: Mapping[str, Inflight]) -> "Snapshot":
        """This snapshot plus this router's own in-flight counts per worker."""
        by_id = self.by_id
        fresh = {wid: add_inflight(by_id[wid], c) for wid, c in counts.items() if wid in by_id}
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


def add_inflight(w: WorkerLoad, c: Inflight) -> WorkerLoad:
    return dataclasses.replace(w, inflight=w.inflight + c[0], inflight_prompt_tokens=w.inflight_prompt_tokens + c[1],
                               inflight_blocks=w.inflight_blocks + c[2], inflight_heavy=w.inflight_heavy + c[3])


@dataclass(frozen=True)
class RouteRequest:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    exclude: frozenset[str] = field(default_factory=frozenset)  # workers that failed this request
    block_hashes: tuple[int, ...] = ()  # of the prompt's full blocks, as workers compute them
    block_size: int = 16
    kind: str = "completion"  # "completion" | "chat": a feature of the output-length prediction
    colocated: bool = False  # no prefill pool: the decode worker prefills every request

    @property
    def features(self) -> RequestFeatures:
        return RequestFeatures(self.num_prompt_tokens, self.max_tokens, self.block_hashes[0] if self.block_hashes else 0, self.kind)


@dataclass(frozen=True)
class Route:
    decode: WorkerLoad
    prefill: WorkerLoad | None = None  # None: the decode worker prefills the prompt itself
    prefill_cached_blocks: int = 0  # the chosen workers' cached prefix, as the index believes
    decode_cached_blocks: int = 0
    predicted_ttft: float = 0.0  # seconds; 0: this policy does not predict
    predicted_wait: float = 0.0  # of which queueing behind other requests
    predicted_output: int = 0
    heavy: bool = False

    @property
    def path(self) -> str:
        return "local" if self.prefill is None else "disaggregated"


@dataclass(frozen=True)
class Outcome:
    """What a finished request teaches the policy."""

    route: Route
    request: RouteRequest
    prefill_seconds: float  # the worker's own compute time for the prompt (local: until the first token)
    prefill_cached_tokens: int
    decode_cached_tokens: int
    transfer_seconds: float
    kv_bytes: int
    output_tokens: int
    ttft: float  # as the router measured it, arrival to first token


def admission_refusal(route: Route, slo_ttft_s: float, slack: float) -> str | None:
    """Why a request routed so should be refused at once, or None to serve it. Refused: its
    predicted TTFT exceeds the SLO x slack *because of work queued ahead of it*; a request that
    would be late on an idle placement is served (waiting could not help it)."""
    allowed = slo_ttft_s * slack
    if route.predicted_ttft <= allowed or route.predicted_wait <= 0:
        return None
    return (f"predicted TTFT {route.predicted_ttft * 1000:.0f} ms exceeds the allowed {allowed * 1000:.0f} ms (TTFT SLO x slack {slack:g}); "
            f"{route.predicted_wait * 1000:.0f} ms of it is waiting for queued work")


class NoWorkerError(StatusError):
    """No worker can take the request now (UNAVAILABLE: retry)."""

    def __init__(self, message: str) -> None:
        super().__init__("UNAVAILABLE", message)


class PrefixLookup(Protocol):
    def match(self, block_hashes: Sequence[int]) -> dict[str, int]: ...


class RoutingPolicy(abc.ABC):
    name = "abstract"

    @abc.abstractmethod
    def choose(self, snapshot: Snapshot, request: RouteRequest) -> Route:
        """Where the request goes; NoWorkerError if a pool has no usable worker."""

    def observe(self, outcome: Outcome) -> None:
        """Learn from a finished request (policies that predict)."""

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
        i = next(self._counter)
        d = self.candidates(snapshot, request, "decode")
        if request.colocated:
            return Route(decode=d[i % len(d)])
        p = self.candidates(snapshot, request, "prefill")
        return Route(decode=d[i % len(d)], prefill=p[i % len(p)])


class LeastLoaded(RoutingPolicy):
    """Prefill: fewest prompt tokens waiting (the routers' in-flight prompts, then the queue
    the worker last reported). Decode: fewest requests in flight, then fewest used + reserved
    blocks. The routers' own counts come first because heartbeats lag a burst by up to a
    second. Ties go round-robin so equal workers share the load."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, snapshot: Snapshot, request: RouteRequest) -> Route:
        i = next(self._counter)
        d = [snapshot.load(w) for w in self.candidates(snapshot, request, "decode")]
        best_d = d[min(range(len(d)), key=lambda k: (d[k].inflight, d[k].used_blocks + d[k].reserved_blocks, (k - i) % len(d)))]
        if request.colocated:
            return Route(decode=best_d)
        p = [snapshot.load(w) for w in self.candidates(snapshot, request, "prefill")]
        best_p = p[min(range(len(p)), key=lambda k: (p[k].inflight_prompt_tokens, p[k].queued_prefill_tokens, (k - i) % len(p)))]
        return Route(decode=best_d, prefill=best_p)


class _BoundedLoad:
    """At most `factor` x an equal share of the last `window` picks per worker: the cap that
    keeps cache affinity from becoming a hotspot (bounded-load hashing's rule, over recent
    requests). A worker at its cap waits for the others to catch up, unless what draws the
    request to it is a prefix no other recent request was routed by (a conversation's own
    history, not a system prompt many share): moving that request away would resend its whole
    history and spread nothing that could pile up. Even then a worker takes at most
    `HARD_FACTOR` x its share."""

    HARD_FACTOR = 1.5

    def __init__(self, factor: float, window: int) -> None:
        self.factor = factor
        self.recent: deque[str] = deque(maxlen=window)
        self.counts: Counter[str] = Counter()
        # the deepest cached block that drew each recent request to its worker
        self.prefixes: deque[int | None] = deque(maxlen=window)
        self.prefix_counts: Counter[int] = Counter()

    def allows(self, worker_id: str, pool_size: int, prefix: int | None = None) -> bool:
        """`prefix`: the deepest block of the prompt this worker caches (None: none)."""
        share = (len(self.recent) + 1) / pool_size
        if self.counts[worker_id] + 1 <= math.ceil(self.factor * share):
            return True
        private = prefix is not None and self.prefix_counts[prefix] == 0
        return private and self.counts[worker_id] + 1 <= math.ceil(self.HARD_FACTOR * share)

    def record(self, worker_id: str, prefix: int | None = None) -> None:
        if len(self.recent) == self.recent.maxlen:
            self.counts[self.recent[0]] -= 1
            if self.prefixes[0] is not None:
                self.prefix_counts[self.prefixes[0]] -= 1
        self.recent.append(worker_id)
        self.counts[worker_id] += 1
        self.prefixes.append(prefix)
        if prefix is not None:
            self.prefix_counts[prefix] += 1


class WorkloadAware(RoutingPolicy):
    """The pair with the lowest predicted TTFT, the decode side chosen for headroom and mix.

    decode: the workers with KV room for the blocks of the prompt they lack plus the predicted
            output; of those, the one holding the longest cached prefix of the prompt when that
            saves at least `affinity_blocks` blocks of transfer, else (TetriInfer) of two drawn
            at random the one running fewer heavy decodes
    prefill: predicted TTFT = wait for the prompt tokens queued ahead + the larger of computing
            the tokens it has not cached and moving the KV the decode worker lacks (the push
            overlaps the compute, layer by layer), at this worker's learned throughput and this
            pair's learned bandwidth
    local:  when the decode worker lacks at most `local_prefill_tokens` of the prompt and has
            no more than that much prefill work waiting, it prefills that part itself
    Both pools pass the bounded-load cap. The route carries its predicted TTFT for admission."""

    name = "workload_aware"

    def __init__(self, index: PrefixLookup | None = None, *, local_prefill_tokens: int = 0, balance_factor: float = 1.15,
                 balance_window: int = 64, candidates_per_pool: int = 8, affinity_blocks: int = 4, kv_block_bytes: int = 0,
                 prefill_model: PrefillModel | None = None, transfer_model: TransferModel | None = None,
                 lengths: OutputLengthModel | None = None, seed: int | None = None) -> None:
        self.index = index
        self.local_prefill_tokens = local_prefill_tokens
        self.top = candidates_per_pool
        self.affinity_blocks = affinity_blocks
        self.kv_block_bytes = kv_block_bytes
        self.prefill_model = prefill_model or PrefillModel()
        self.transfer_model = transfer_model or TransferModel()
        self.lengths = lengths or OutputLengthModel()
        self.balance = {"prefill": _BoundedLoad(balance_factor, balance_window), "decode": _BoundedLoad(balance_factor, balance_window)}
        self._rng = random.Random(seed)
        # what TTFT holds beyond the modelled compute and transfer (calls, scheduling ticks, the
        # first layer's wait...), learned per path as the error of past predictions
        self._overhead = {"local": PrefillModel.overhead_model(), "disaggregated": PrefillModel.overhead_model()}

    def choose(self, snapshot: Snapshot, request: RouteRequest) -> Route:
        matched = self.index.match(request.block_hashes) if self.index is not None and request.block_hashes else {}
        bs, n = request.block_size, request.num_prompt_tokens
        blocks = -(-n // bs)
        out = self.lengths.predict(request.features)
        heavy = out >= self.lengths.heavy_tokens

        def lacks(w: WorkerLoad) -> int:
            return blocks - min(matched.get(w.worker_id, 0), blocks)

        def fits(w: WorkerLoad, extra: int) -> bool:
            return w.free_blocks - w.inflight_blocks >= lacks(w) + extra

        def local_ttft(w: WorkerLoad) -> float:  # the decode worker prefilling what it lacks, after its backlog
            backlog = w.queued_prefill_tokens + w.inflight_prompt_tokens
            return self.prefill_model.seconds(w.worker_id, n, backlog + n - (blocks - lacks(w)) * bs)

        room = lambda w: fits(w, -(-out // bs))  # noqa: E731 - the prompt's missing blocks and the predicted output
        if request.colocated:
            d = self._pick(snapshot, request, "decode", matched, local_ttft, room)
        else:
            d = self._pick_decode(snapshot, request, matched, room, lacks)
        self.balance["decode"].record(d.worker_id, _deepest(request, matched, d))
        d_cached = blocks - lacks(d)
        missing = n - d_cached * bs
        backlog = d.queued_prefill_tokens + d.inflight_prompt_tokens
        if request.colocated or (missing <= self.local_prefill_tokens and backlog + missing <= 2 * self.local_prefill_tokens and fits(d, 0)):
            wait = self.prefill_model.seconds(d.worker_id, n, backlog)
            predicted = wait + self.prefill_model.seconds(d.worker_id, n, missing) + self._extra("local")
            return Route(decode=d, decode_cached_blocks=d_cached, predicted_ttft=predicted, predicted_wait=wait, predicted_output=out, heavy=heavy)
        move = lacks(d) * self.kv_block_bytes

        def ttft(p: WorkerLoad) -> tuple[float, float]:
            wait = self.prefill_model.seconds(p.worker_id, n, p.queued_prefill_tokens + p.inflight_prompt_tokens)
            compute = self.prefill_model.seconds(p.worker_id, n, n - min(matched.get(p.worker_id, 0), blocks) * bs)
            return wait + max(compute, self.transfer_model.seconds(p.worker_id, d.worker_id, move)), wait

        p = self._pick(snapshot, request, "prefill", matched, lambda w: ttft(w)[0], lambda w: fits(w, 0))
        self.balance["prefill"].record(p.worker_id, _deepest(request, matched, p))
        predicted, wait = ttft(p)
        predicted += self._extra("disaggregated")
        return Route(decode=d, prefill=p, prefill_cached_blocks=min(matched.get(p.worker_id, 0), blocks), decode_cached_blocks=d_cached,
                     predicted_ttft=predicted, predicted_wait=wait, predicted_output=out, heavy=heavy)

    def _pick_decode(self, snapshot: Snapshot, request: RouteRequest, matched: dict[str, int], fits, lacks) -> WorkerLoad:
        pool = self._eligible(snapshot, request, "decode", matched, fits)
        least = min(lacks(w) for w in pool)
        # workers whose caches save about as much as the best one's: the others would move
        # at least `affinity_blocks` more of the prompt
        near = [w for w in pool if lacks(w) - least < self.affinity_blocks]
        if len(near) == 1:
            return near[0]
        two = self._rng.sample(near, 2)  # TetriInfer: of two, the one with fewer heavy decodes
        # then the smaller load; on a tie the one picked less recently, so that two idle
        # workers share new conversations instead of a coin leaving one with both
        recent = self.balance["decode"].counts
        return min(two, key=lambda w: (w.inflight_heavy, lacks(w), w.used_blocks + w.reserved_blocks + w.inflight_blocks, recent[w.worker_id]))

    def _pick(self, snapshot: Snapshot, request: RouteRequest, role: str, matched: dict[str, int], cost, fits) -> WorkerLoad:
        pool = self._eligible(snapshot, request, role, matched, fits)
        cap = self.balance[role]
        # equal costs go to the worker with fewer recent requests, then fewer in flight
        return min(pool, key=lambda w: (cost(w), cap.counts[w.worker_id], w.inflight))

    def _eligible(self, snapshot: Snapshot, request: RouteRequest, role: str, matched: dict[str, int], fits) -> list[WorkerLoad]:
        """Workers of a pool that fit the request and are within their cap, among the few that
        can be best: the least loaded as reported, those caching a prefix of the prompt, and
        those the routers sent requests to since (their load moved). Costs only grow with load
        and shrink with cached blocks, so no other worker can win."""
        pool = self.candidates(snapshot, request, role)
        size = len(pool)
        if size > self.top:
            by_id = snapshot.by_id
            extra = (by_id[i] for i in {*matched, *snapshot.inflight} if i in by_id and i not in request.exclude)
            pool = list({w.worker_id: w for w in [*pool[: self.top], *(w for w in extra if w.role == role)]}.values())
        pool = [snapshot.load(w) for w in pool]
        pool = [w for w in pool if fits(w)] or pool
        cap = self.balance[role]
        return [w for w in pool if cap.allows(w.worker_id, size, _deepest(request, matched, w))] or pool

    def _extra(self, path: str) -> float:
        return self._overhead[path].get(path) or 0.0

    def observe(self, o: Outcome) -> None:
        n, route = o.request.num_prompt_tokens, o.route
        if route.predicted_ttft > 0:
            self._overhead[route.path].add(route.path, max(0.0, self._extra(route.path) + o.ttft - route.predicted_ttft))
        if route.prefill is not None:
            self.prefill_model.observe(route.prefill.worker_id, n, n - o.prefill_cached_tokens, o.prefill_seconds)
            self.transfer_model.observe(route.prefill.worker_id, route.decode.worker_id, o.kv_bytes, o.transfer_seconds)
        else:
            self.prefill_model.observe(route.decode.worker_id, n, n - o.decode_cached_tokens, o.prefill_seconds)
        self.lengths.observe(o.request.features, o.output_tokens)


def _deepest(request: RouteRequest, matched: Mapping[str, int], w: WorkerLoad) -> int | None:
    """The hash of the deepest block of the request's prompt that `w` caches, if any."""
    n = min(matched.get(w.worker_id, 0), len(request.block_hashes))
    return request.block_hashes[n - 1] if n > 0 else None


POLICIES: dict[str, type[RoutingPolicy]] = {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "workload_aware": WorkloadAware}


def make_policy(name: str, **options) -> RoutingPolicy:
    """`options` go to policies that take them (workload_aware: index, local_prefill_tokens,
    balance_factor, balance_window, kv_block_bytes, the predictors, seed)."""
    if name not in POLICIES:
        raise ValueError(f"routing policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name](**options) if name == "workload_aware" else POLICIES[name]()
