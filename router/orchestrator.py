"""Per-request orchestration, as coroutines on the router's event loop: validate, route, run
the two legs, stream, account.

A request's journey through `Orchestrator.generate`:
    validate (prompt, context, sampling, model name)   -> INVALID_ARGUMENT naming the field
    route: the policy picks a Route from the cluster snapshot and the prefix index:
      disaggregated: reserve on D (its cached prefix pinned), open D's stream, prefill on P
      local:         D prefills the prompt itself (it lacks only a little of it) and decodes
    a leg that fails before the first token is retried on another worker (bounded)
    first token streamed at once, then D's tokens; text is detokenized here
    finish, failure of a leg (the other is aborted), client gone (both aborted)
Every step's time goes into the request's `Timings`, logged once per request and kept for
`timings(request_id)`; metrics are updated as the request moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace

from splitserve.engine.block_pool import block_hashes
from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from splitserve.engine.prompt import check_fits, check_token_ids, encode_prompt
from splitserve.engine.sampling_params import SamplingParams, TopLogprobs
from splitserve.engine.tokenizer import LONG_TEXT_CHARS, IncrementalDetokenizer, Tokenizer, cut_at_stop_string
from splitserve.proto.convert import params_to_proto, top_from_proto
from splitserve.proto.status import StatusError, status_of
from splitserve.router.cluster_view import ClusterView
from splitserve.router.legs import LegError, WorkerClient, prefill_watching
from splitserve.router.metrics import RouterMetrics
from splitserve.router.policy import NoWorkerError, Outcome, Route, RouteRequest, RoutingPolicy, WorkerLoad, admission_refusal

logger = logging.getLogger(__name__)
# A leg failing with these is tried again on another worker (nothing has reached the client yet).
RETRYABLE = {"prefill": {"UNAVAILABLE"}, "decode": {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}}
TIMINGS_KEPT = 4096


@dataclass
class GenerateInput:
    prompt: str | list[int]
    params: SamplingParams
    request_id: str = ""
    model: str = ""
    kind: str = "completion"  # "completion" | "chat"
    slo_ttft_ms: float | None = None  # this request's SLO; None: the cluster's (slo.ttft_ms)
    slo_tpot_ms: float | None = None


class OverloadedError(StatusError):
    """This router already has its most requests in flight (router.max_concurrent_requests)."""

    def __init__(self, limit: int) -> None:
        super().__init__("UNAVAILABLE", f"the router is serving its limit of {limit} concurrent requests; retry shortly")
        self.retry_after = 1.0


class SLORefusedError(StatusError):
    """Admission control: even the best placement would miss the request's TTFT SLO."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__("RESOURCE_EXHAUSTED", message)
        self.retry_after = retry_after


@dataclass
class Timings:
    request_id: str
    route: float = 0.0
    reserve: float = 0.0
    prefill_queue: float = 0.0
    prefill: float = 0.0
    transfer: float = 0.0
    first_decode: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    prefill_worker: str = ""
    decode_worker: str = ""
    retries: int = 0
    kv_bytes: int = 0  # KV bytes actually moved to the decode worker
    path: str = ""  # "disaggregated" | "local"
    prefill_cached_tokens: int = 0  # prompt tokens the prefill worker did not compute
    decode_cached_tokens: int = 0  # prompt tokens the decode worker already held (not moved)
    predicted_ttft: float = 0.0  # what the routing policy expected (workload_aware)
    predicted_output: int = 0
    outcome: str = "running"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Chunk:
    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    timings: Timings | None = None
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per token, when params.top_logprobs > 0


@dataclass
class _Started:
    """A request placed on workers: its first token when the prefill worker sent it, and the
    decode worker's stream, whose first `skip` tokens repeat it."""

    first_token: list[int]
    first_logprob: list[float]
    first_top: list[TopLogprobs]
    stream: AsyncIterator
    skip: int
    cached_tokens: int  # prompt tokens not recomputed
    route: Route
    request: RouteRequest


@dataclass
class _Attempts:
    """A request's budget of re-dispatches (before its first token, and failovers after) and
    the workers that already failed it."""

    max_retries: int
    n: int = 0
    exclude: set[str] = field(default_factory=set)
    last: LegError | None = None

    def spent(self) -> bool:
        return self.n >= self.max_retries

    def failed(self, e: LegError) -> None:
        self.n += 1
        self.exclude.add(e.worker_id)
        self.last = e


@dataclass
class _Stream:
    """What the client has received of a request so far."""

    rid: str
    prompt: list[int]
    inp: GenerateInput
    timings: Timings
    arrival: float
    text: "_Text"
    tokens: list[int] = field(default_factory=list)
    last_emit: float = 0.0


@dataclass
class _Legs:
    """The workers serving a request's current attempt. Each attempt has its own id on the
    workers (`leg_id`), so a late abort of a failed attempt cannot touch the next one."""

    prefill: WorkerClient | None = None
    decode: WorkerClient | None = None
    leg_id: str = ""
    aborted: bool = False
    started: bool = False  # its stream was read: from then on the stream cleans up after it


class Orchestrator:
    def __init__(
        self,
        view: ClusterView,
        policy: RoutingPolicy,
        metrics: RouterMetrics,
        tokenizer: Tokenizer,
        model_config: ModelConfig,
        model_name: str,
        *,
        max_model_len: int | None = None,
        transport: str = "",
        timeout: float = 600.0,
        max_retries: int = 1,
        route_wait: float = 5.0,
        block_size: int = 16,
        colocated: bool = False,
        admission: bool = False,
        slo_ttft_ms: float = 5000.0,
        slo_slack: float = 1.0,
        max_concurrent: int | None = None,
    ) -> None:
        self.view = view
        self.policy = policy
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.model_name = model_name
        self.max_model_len = min(max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings)
        self.transport = transport
        self.timeout = timeout
        self.max_retries = max_retries
        self.route_wait = route_wait
        self.block_size = block_size
        self.colocated = colocated
        self.admission, self.slo_ttft_ms, self.slo_slack = admission, slo_ttft_ms, slo_slack
        self.max_concurrent = max_concurrent
        self._legs: dict[str, _Legs] = {}
        self._timings: OrderedDict[str, Timings] = OrderedDict()

    def _kv_tokens(self) -> list[int]:
        """How many tokens each ready decode worker's KV cache holds, as last reported."""
        return [w.total_blocks * self.block_size for w in self.view.snapshot().decode if w.total_blocks > 0]

    def context_limit(self) -> int:
        """The most tokens (prompt + output) any decode worker can take: the model's context, or
        fewer when the smallest ready decode worker's KV cache holds fewer. Chat's default length
        runs to this, not past it."""
        return min([self.max_model_len, *self._kv_tokens()])

    async def encoded(self, prompt: str | list[int]) -> str | list[int]:
        """A long text prompt as its token ids, encoded on a worker thread: the tokenizer takes
        seconds over a few MB, which on the event loop would stall every other request and the
        health checks meanwhile. Other prompts are returned as they are, for `validate`."""
        if isinstance(prompt, str) and len(prompt) > LONG_TEXT_CHARS:
            return await asyncio.to_thread(encode_prompt, self.tokenizer, self.model_config.vocab_size, prompt)
        return prompt

    # ---- the request ---------------------------------------------------------------------
    def validate(self, inp: GenerateInput) -> list[int]:
        if inp.model and inp.model != self.model_name:
            raise ModelNotFoundError("model", f"{inp.model!r} is not served here; this cluster serves {self.model_name!r}")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(inp, name)
            if value is not None and not value > 0:
                raise InvalidRequestError(name, f"must be > 0 milliseconds, got {value}")
        if not isinstance(inp.prompt, str):  # too long is said before a million ids are checked one by one on the event loop
            check_fits(len(inp.prompt), inp.params.max_tokens, self.max_model_len)
        ids = encode_prompt(self.tokenizer, self.model_config.vocab_size, inp.prompt)
        check_fits(len(ids), inp.params.max_tokens, self.max_model_len)
        held = max(self._kv_tokens(), default=None)
        if held is not None and len(ids) + inp.params.max_tokens > held:  # no decode worker could take it: say so here, naming the field
            field = "prompt" if len(ids) >= held else "max_tokens"
            raise ContextLengthExceededError(
                field, f"prompt ({len(ids)} tokens) + max_tokens ({inp.params.max_tokens}) exceeds the KV cache of the largest decode worker "
                f"({held} tokens): this cluster's maximum context length is {held} tokens (the model's {self.max_model_len})")
        check_token_ids(inp.params, self.model_config.vocab_size)
        return ids

    def generate(self, inp: GenerateInput) -> AsyncIterator[Chunk]:
        """Validate at once (raises before the first chunk), then stream. Closing the stream
        early (the client left) aborts both legs. Beyond `max_concurrent` requests in flight, over
        both APIs, the answer is UNAVAILABLE at once (before any work for it)."""
        return self.generate_many([inp])[0]

    def generate_many(self, inputs: list[GenerateInput]) -> list[AsyncIterator[Chunk]]:
        """`generate` for several requests that stand or fall together (the choices of one API
        request): all are validated and admitted, or none is."""
        if self.max_concurrent is not None and len(inputs) > self.max_concurrent:  # never admitted: not a 'retry shortly'
            raise InvalidRequestError("n", f"asks {len(inputs)} choices (prompts x n); this router serves at most {self.max_concurrent} "
                                           "requests at once (router.max_concurrent_requests)")
        if self.max_concurrent is not None and len(self._legs) + len(inputs) > self.max_concurrent:
            self.metrics.refused.labels("overloaded").inc()
            raise OverloadedError(self.max_concurrent)
        prompts = [self.validate(inp) for inp in inputs]
        rids = [inp.request_id or f"req-{uuid.uuid4().hex}" for inp in inputs]
        for i, rid in enumerate(rids):
            if rid in self._legs or rid in rids[:i]:
                raise InvalidRequestError("request_id", f"{rid!r} is already in flight")
        for rid in rids:
            self._legs[rid] = _Legs()
        return [self._run(rid, prompt, inp) for rid, prompt, inp in zip(rids, prompts, inputs)]

    def discard(self, request_id: str) -> None:
        """Forget a request of `generate_many` whose stream was never read (a sibling failed
        first): it holds its admission and nothing else."""
        legs = self._legs.get(request_id)
        if legs is not None and not legs.started:
            del self._legs[request_id]

    async def _run(self, rid: str, prompt: list[int], inp: GenerateInput) -> AsyncIterator[Chunk]:
        t = Timings(rid)
        arrival = time.monotonic()
        deadline = arrival + self.timeout
        left = lambda: max(0.001, deadline - time.monotonic())  # noqa: E731
        legs = self._legs[rid]
        legs.started = True
        held: list[tuple[str, str, tuple[int, int, int, int]]] = []  # (worker, role, in-flight counts) to give back
        s = _Stream(rid, prompt, inp, t, arrival, _Text(self.tokenizer, inp.params.stop, inp.params.skip_special_tokens))
        attempts = _Attempts(self.max_retries)
        self.metrics.running.inc()
        try:
            started = await self._dispatch(rid, prompt, inp, t, legs, held, left, attempts)
            while True:
                try:
                    async for out in self._relay(s, started, held):
                        yield out
                    return
                except LegError as e:
                    # the decode worker was lost mid-stream: continue the request elsewhere from the
                    # tokens the client already has (a continuation: the same tokens a single
                    # engine would produce, none repeated, none missing)
                    if not s.tokens or e.leg != "decode" or e.status not in RETRYABLE["decode"] or attempts.spent() or legs.aborted:
                        raise
                    logger.warning("%s after %d tokens; continuing elsewhere", e, len(s.tokens))
                    self._abort_legs(rid, legs, "decode leg lost")
                    self._give_back(held)
                    attempts.failed(e)
                    self.metrics.retries.labels("decode_failover").inc()
                    started = await self._dispatch(rid, prompt, inp, t, legs, held, left, attempts, output_prefix=list(s.tokens))
        except (GeneratorExit, asyncio.CancelledError):
            if t.outcome != "ok":  # closed after its last chunk (n > 1 choices are read that far) is not cancelled
                t.outcome = "cancelled"
                self._abort_legs(rid, legs, "client went away")
            raise
        except Exception as e:
            err = self._fail(rid, legs, e)
            t.outcome = err.status
            if err is e:
                raise
            raise err from None
        finally:
            self._give_back(held)
            self.metrics.running.dec()
            self.metrics.requests.labels(t.outcome if t.outcome != "running" else "INTERNAL").inc()
            t.e2e = t.e2e or time.monotonic() - arrival
            self._finish(rid, t)

    async def _relay(self, s: "_Stream", started: _Started, held: list) -> AsyncIterator[Chunk]:
        """The client's chunks from one placement of the request; returns once it finished."""
        t = s.timings
        if started.first_token:
            yield self._emit(s, held, started.first_token, started.first_logprob, started.first_top)
        skip = started.skip
        async for chunk in started.stream:
            tokens, logprobs, top = list(chunk.token_ids), list(chunk.logprobs), top_from_proto(chunk.top_logprobs)
            if skip:
                dropped = min(skip, len(tokens))
                tokens, logprobs, top, skip = tokens[dropped:], logprobs[dropped:], top[dropped:], skip - dropped
            if chunk.kv_bytes or chunk.kv_transfer_seconds:
                t.transfer, t.kv_bytes = chunk.kv_transfer_seconds, chunk.kv_bytes
                self.metrics.kv_seconds.observe(t.transfer)
                self.metrics.kv_bytes.inc(t.kv_bytes)
            out = self._emit(s, held, tokens, logprobs, top)
            if chunk.finished:
                out.text += s.text.flush()
                self._finished(t, s.arrival, out, chunk.finish_reason, s.prompt, s.tokens, started)
            if tokens or out.finished:
                yield out
            if chunk.finished:
                return
        raise StatusError("INTERNAL", f"decode stream of {s.rid} ended without finishing")

    def _emit(self, s: "_Stream", held: list, tokens: list[int], logprobs: list[float], top: list[TopLogprobs]) -> Chunk:
        """The chunk for new tokens, with the latencies they close: TTFT for the very first,
        inter-token gaps after."""
        now, t = time.monotonic(), s.timings
        if tokens and not s.tokens:
            t.ttft = now - s.arrival
            self.metrics.ttft.observe(t.ttft)
            self._give_back(held, prompts_only=True)  # the prompt is computed: it no longer loads a prefill queue
        elif tokens:
            if len(s.tokens) == 1:
                t.first_decode = now - s.last_emit
            for _ in tokens:
                self.metrics.itl.observe((now - s.last_emit) / len(tokens))
        if tokens:
            s.tokens += tokens
            s.last_emit = now
        return Chunk(s.rid, tokens, logprobs, "".join(s.text.push(tok) for tok in tokens), top_logprobs=top)

    def _finished(self, t: Timings, arrival: float, out: Chunk, reason: str, prompt: list[int], tokens: list[int], started: _Started) -> None:
        t.e2e = time.monotonic() - arrival
        t.outcome = "ok"
        out.finished, out.finish_reason = True, reason
        out.usage = {"prompt_tokens": len(prompt), "completion_tokens": len(tokens), "cached_tokens": started.cached_tokens}
        out.timings = t
        self.policy.observe(Outcome(started.route, started.request, t.prefill, t.prefill_cached_tokens, t.decode_cached_tokens,
                                    t.transfer, t.kv_bytes, len(tokens), t.ttft))
        m = self.metrics
        m.e2e.observe(t.e2e)
        m.prompt_tokens.inc(len(prompt))
        m.generation_tokens.inc(len(tokens))
        m.paths.labels(t.path).inc()
        for pool, hits in (("prefill", t.prefill_cached_tokens), ("decode", t.decode_cached_tokens)):
            if pool == "decode" or t.path == "disaggregated":
                m.prefix_queries.labels(pool).inc(len(prompt))
                m.prefix_hits.labels(pool).inc(hits)

    def _fail(self, rid: str, legs: _Legs, e: Exception) -> Exception:
        """The one failure path of a request: decide what its client is told, abort both legs."""
        if legs.aborted:  # whatever a leg reported, the client asked for this
            err: Exception = StatusError("ABORTED", f"request {rid} aborted by the client")
        elif status_of(e) == "INTERNAL" and not isinstance(e, StatusError):  # a fault of the router itself
            logger.exception("request %s failed in the router", rid)
            err = StatusError("INTERNAL", f"request {rid} failed in the router: {type(e).__name__}: {e}")
        else:
            err = e
        self._abort_legs(rid, legs, f"request failed: {err}")
        return err

    async def _dispatch(self, rid: str, prompt: list[int], inp: GenerateInput, t: Timings, legs: _Legs, held: list, left,
                        attempts: "_Attempts", output_prefix: list[int] | None = None) -> _Started:
        """Route and start the request (or its continuation after `output_prefix`); a leg that
        fails before its first token (its worker unreachable or full) is tried again elsewhere,
        within the request's budget of `max_retries` re-dispatches."""
        params, prefix = inp.params, output_prefix or []
        p_params = params_to_proto(params)
        bs = self.block_size
        context = prompt + prefix  # a continuation's KV covers what it generated so far
        hashes = tuple(block_hashes(context, bs))
        while True:
            if legs.aborted:
                raise StatusError("ABORTED", f"request {rid} aborted")
            start = time.monotonic()
            request = RouteRequest(rid, len(context), params.max_tokens - len(prefix), frozenset(attempts.exclude), hashes, bs, inp.kind, self.colocated)
            try:
                route = await self._route(request, left)
            except NoWorkerError as e:
                if attempts.last is None:
                    raise
                raise StatusError(attempts.last.status, f"{attempts.last} (no other {attempts.last.leg} worker to retry on: {e})") from None
            t.route += time.monotonic() - start
            if attempts.n == 0:
                self._admit(route, inp)
            t.retries, t.path = attempts.n, route.path
            t.predicted_ttft, t.predicted_output = route.predicted_ttft, route.predicted_output
            t.prefill_worker, t.decode_worker = route.prefill.worker_id if route.prefill else "", route.decode.worker_id
            legs.leg_id = lid = rid if attempts.n == 0 else f"{rid}.retry{attempts.n}"
            try:
                started = await self._start(route, request, lid, prompt, prefix, p_params, t, legs, held, left)
                if legs.aborted:  # the client's abort came while these legs were being set up, before they could hear it
                    self._abort_legs(rid, legs, "aborted by client")
                    raise StatusError("ABORTED", f"request {rid} aborted")
                return started
            except LegError as e:
                self._abort_legs(rid, legs, f"{e.leg} leg failed")
                self._give_back(held)
                if e.status not in RETRYABLE[e.leg] or attempts.spent() or legs.aborted:
                    raise
                attempts.failed(e)
                logger.warning("%s; retrying elsewhere", e)
                self.metrics.retries.labels(e.leg).inc()

    def _admit(self, route: Route, inp: GenerateInput) -> None:
        """Refuse at once what would miss its TTFT SLO because of queued work: better a 429 now,
        with the time to come back, than a timeout later."""
        if not self.admission:
            return
        why = admission_refusal(route, (inp.slo_ttft_ms or self.slo_ttft_ms) / 1000, self.slo_slack)
        if why is not None:
            self.metrics.refused.labels("slo").inc()
            raise SLORefusedError(why, retry_after=max(1.0, route.predicted_wait))

    async def _start(self, route: Route, request: RouteRequest, lid: str, prompt: list[int], prefix: list[int], p_params, t: Timings,
                     legs: _Legs, held: list, left) -> _Started:
        n = len(prompt) + len(prefix)
        bs, blocks = self.block_size, -(-n // self.block_size)
        local = route.prefill is None  # then the decode worker has the prompt's missing tokens to compute
        self._hold(held, route.decode, n - route.decode_cached_blocks * bs if local else 0, blocks - route.decode_cached_blocks, route.heavy)
        legs.decode = self.view.client(route.decode)
        legs.prefill = None
        start = time.monotonic()
        if local:  # selective disaggregation: the decode worker prefills it
            stream = legs.decode.open_generate(lid, prompt, p_params, left(), prefix)
            head = await stream.first()  # a failure before the first token may still be retried
            t.decode_cached_tokens = head.num_cached_tokens
            t.prefill = time.monotonic() - start
            return _Started([], [], [], stream.after(head), 0, head.num_cached_tokens, route, request)
        self._hold(held, route.prefill, n - route.prefill_cached_blocks * bs, blocks - route.prefill_cached_blocks)
        legs.prefill = self.view.client(route.prefill)
        desc = await legs.decode.reserve(lid, prompt, p_params, self.transport, min(left(), 30.0), prefix)
        t.reserve = time.monotonic() - start
        t.decode_cached_tokens = desc.num_cached_blocks * bs
        self.metrics.route.observe(t.route + t.reserve)
        stream = legs.decode.open_decode(lid, left())
        try:
            pre = await prefill_watching(legs.prefill, stream, lid, prompt, p_params, desc, left(), prefix)
        except LegError:
            stream.cancel()
            raise
        t.prefill_queue, t.prefill, t.prefill_cached_tokens = pre.queue_seconds, pre.prefill_seconds, pre.num_cached_tokens
        self.metrics.queue.observe(t.prefill_queue)
        self.metrics.prefill.observe(t.prefill)
        first_top = top_from_proto([pre.first_top_logprobs]) if pre.HasField("first_top_logprobs") else [[]]
        return _Started([pre.first_token], [pre.first_logprob], first_top, stream, 1, pre.num_cached_tokens, route, request)

    async def _route(self, request: RouteRequest, left) -> Route:
        """The policy's pick. When a pool looks empty (a worker restarting, the registry just
        restarted and not yet re-filled by heartbeats) wait a little for one to appear; when
        every worker of a pool already failed this request, say so at once."""
        end = time.monotonic() + min(self.route_wait, left())
        while True:
            snapshot = self.view.snapshot()
            need = request.num_prompt_tokens + request.max_tokens  # a decode worker whose KV cache holds fewer would refuse it
            small = {w.worker_id for w in snapshot.decode if 0 < w.total_blocks * self.block_size < need}
            try:
                return self.policy.choose(snapshot, replace(request, exclude=request.exclude | small) if small else request)
            except NoWorkerError as e:
                if ((snapshot.prefill or self.colocated) and snapshot.decode) or time.monotonic() >= end:
                    stale = self.view.stale()
                    if stale:  # the workers may be fine: it is the registry the router cannot read
                        raise NoWorkerError(f"{e}: {stale}") from None
                    raise
                await asyncio.sleep(0.1)

    # ---- bookkeeping ---------------------------------------------------------------------
    def _hold(self, held: list, worker: WorkerLoad, prompt_tokens: int, blocks: int, heavy: bool = False) -> None:
        counts = (1, prompt_tokens, blocks, int(heavy))
        self.view.add_inflight(worker.worker_id, counts)
        held.append((worker.worker_id, worker.role, counts))

    def _give_back(self, held: list, prompts_only: bool = False) -> None:
        """Return this request's in-flight counts: all of them, or (once the prompt is computed)
        what the prompt held: the prefill worker's share, and a local prefill's tokens."""
        keep = []
        for wid, role, (n, tokens, blocks, heavy) in held:
            if not prompts_only or role == "prefill":
                self.view.add_inflight(wid, (-n, -tokens, -blocks, -heavy))
            else:
                self.view.add_inflight(wid, (0, -tokens, 0, 0))
                keep.append((wid, role, (n, 0, blocks, heavy)))
        held[:] = keep if prompts_only else []

    def _abort_legs(self, rid: str, legs: _Legs, reason: str) -> None:
        """Tell both workers of the current attempt to drop it (without waiting for them)."""
        if legs.decode is not None:
            legs.decode.abort_decode(legs.leg_id, reason)
        if legs.prefill is not None:
            legs.prefill.abort_prefill(legs.leg_id, reason)

    def _finish(self, rid: str, t: Timings) -> None:
        self._legs.pop(rid, None)
        self._timings[rid] = t
        while len(self._timings) > TIMINGS_KEPT:
            self._timings.popitem(last=False)
        if logger.isEnabledFor(logging.INFO):  # the breakdown line costs more than the check
            logger.info("request %s %s", rid, " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in t.to_dict().items() if k != "request_id"))

    def abort(self, rid: str) -> bool:
        legs = self._legs.get(rid)
        if legs is None:
            return False
        legs.aborted = True
        self._abort_legs(rid, legs, "aborted by client")
        return True

    def timings(self, rid: str) -> Timings | None:
        return self._timings.get(rid)


class _Text:
    """The router's detokenizer: the same rule as the engine's, so texts agree. Text that may be
    the start of a stop string is held back until the next tokens say whether it is one: a stop
    string split across tokens must not reach the client in part."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...], skip_special_tokens: bool = True) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stops = stops
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        delta = self.detok.push(token)
        if delta and self.stops:
            cut = cut_at_stop_string(self.detok.text, len(delta), self.stops)
            if cut is not None:
                self.detok.text, self.stopped = cut, True
        text = self.detok.text
        end = len(text) if self.stopped else max(self.sent, len(text) - stop_prefix_length(text, self.stops))
        out, self.sent = text[self.sent : end], end
        return out

    def flush(self) -> str:
        """What was held back, once the request ended for another reason than a stop string."""
        out, self.sent = self.detok.text[self.sent :], len(self.detok.text)
        return out


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins some stop string (0: none)."""
    for k in range(min(len(text), max((len(x) for x in stops), default=1) - 1), 0, -1):
        tail = text[-k:]
        if any(x.startswith(tail) for x in stops):
            return k
    return 0


def timings_to_proto(t: Timings):
    from splitserve.proto import public_pb2

    return public_pb2.Timings(**t.to_dict())

