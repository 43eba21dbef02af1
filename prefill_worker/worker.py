"""The prefill worker's core, free of gRPC.

A request's journey here:
    prefill()  connect (handshake) to the decode side named by the descriptor, once per peer;
               the request joins the engine's queue as prefill-only
    each step  after every layer, the KV of the blocks this step filled is copied out and
               queued on that peer's pusher thread, so sending overlaps the next layers
               while it waits there behind other prompts, its reservation is touched (the
               lease restarts) as long as the engine makes progress (finishes layers)
    first token sampled -> commit queued behind the request's payloads
    commit delivered    -> blocks released (into the prefix cache), the caller gets the token
    any failure         -> the request is aborted here, the decode side is told, the caller
                           gets the error
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from splitserve.engine.engine import LLMEngine, RequestOutput
from splitserve.engine.engine_loop import EngineLoop
from splitserve.engine.errors import UnknownRequestError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledRequest
from splitserve.kv_transfer.errors import HandshakeError, PeerUnavailableError, request_status
from splitserve.kv_transfer.layout import FirstToken, KVLayout, TransferDescriptor
from splitserve.kv_transfer.local import LocalHub
from splitserve.kv_transfer.sender import KVPusher
from splitserve.prefill_worker.pushers import LeaseKeeper, PusherPool, PushError
from splitserve.proto.status import StatusError
from splitserve.proto.tls import TLSFiles

logger = logging.getLogger(__name__)


class PrefillError(StatusError):
    """A prefill failed or was refused; `status` says how. `receiver_lost`: the decode worker
    the KV was for is gone or unreachable, so the request's decode leg failed, not this worker."""

    def __init__(self, status: str, message: str, receiver_lost: bool = False) -> None:
        super().__init__(status, message)
        self.receiver_lost = receiver_lost


@dataclass
class PrefillResult:
    request_id: str
    first: FirstToken
    num_cached_tokens: int
    queue_seconds: float
    prefill_seconds: float


@dataclass
class _Job:
    descriptor: TransferDescriptor
    pusher: KVPusher
    num_prompt_tokens: int
    future: Future = field(default_factory=Future)
    pushed_tokens: int = 0  # KV of tokens before this has been queued for sending
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None


class PrefillWorker:
    def __init__(self, engine: LLMEngine, worker_id: str, *, hub: LocalHub | None = None, token: str | None = None,
                 tls: TLSFiles | None = None) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.layout = KVLayout.from_dict(engine.kv_layout)
        self.block_size = engine.pool.block_size
        self.num_layers = engine.model_config.num_layers
        self._jobs: dict[str, _Job] = {}
        self.pushers = PusherPool(worker_id, self.layout, hub=hub, device=engine.config.device, token=token, tls=tls)
        self.accepting = True  # False once draining: queued prefills finish, no new ones
        self._lock = threading.Lock()
        self.layers_done = 0  # the engine's progress, which keeps queued requests' leases
        engine.on_layer_done = self._on_layer_done
        self.loop = EngineLoop(engine, self._on_outputs, on_crash=self._on_crash, name=f"prefill-{worker_id}")
        self.loop.start()
        self.kv_events = self.loop.kv_events  # what this worker's prefix cache gained and lost

    # ---- requests ------------------------------------------------------------------------
    def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, descriptor: TransferDescriptor, timeout: float,
                output_prefix: list[int] = ()) -> PrefillResult:
        """Prefill the prompt (and a continuation's output prefix), push its KV per the
        descriptor, return the next token once the decode side has the KV."""
        if not self.accepting:
            raise PrefillError("UNAVAILABLE", f"prefill worker {self.worker_id} is draining")
        try:  # refuse a mismatched peer before any work, naming the field that differs
            descriptor.layout.check_peer(self.layout)  # the decode side receives, this side sends
        except HandshakeError as e:
            raise PrefillError(e.status, f"decode worker {descriptor.decode_worker_id}: {e}") from e
        context = len(prompt_token_ids) + len(output_prefix)
        check_descriptor(descriptor, context, self.block_size)
        job = _Job(descriptor, self._pusher(descriptor), context)
        with self._lock:
            if request_id in self._jobs:
                raise PrefillError("ALREADY_EXISTS", f"request {request_id!r} is already being prefilled")
            self._jobs[request_id] = job
        try:
            self.loop.call(lambda e: e.add_request(request_id, prompt_token_ids, params, prefill_only=True, output_prefix=output_prefix))
        except BaseException:
            with self._lock:
                self._jobs.pop(request_id, None)
            raise
        end = time.monotonic() + timeout
        keeper = LeaseKeeper(job.pusher, request_id, descriptor, lambda: self.layers_done)
        while True:
            try:
                return job.future.result(max(0.0, min(0.25, end - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= end:
                    self.abort(request_id, f"prefill deadline of {timeout:g} s exceeded")
                    raise PrefillError("DEADLINE_EXCEEDED", f"prefill of {request_id!r} did not finish within {timeout:g} s") from None
                if job.first_scheduled is None and job.pushed_tokens == 0:  # still queued behind other prompts
                    keeper.tick()

    def _pusher(self, d: TransferDescriptor) -> KVPusher:
        try:
            return self.pushers.get(d)
        except PushError as e:
            raise PrefillError(e.status, str(e), receiver_lost=isinstance(e.__cause__, PeerUnavailableError)) from e

    # ---- hooks on the engine loop thread -------------------------------------------------
    def _on_layer_done(self, layer: int, scheduled: list[ScheduledRequest]) -> None:
        self.layers_done += 1
        bs = self.block_size
        for s in scheduled:
            job = self._jobs.get(s.request.request_id)
            if job is None:
                continue
            end = s.start + s.num_new_tokens
            # from the first block not yet sent (this side's cached prefix goes with the first
            # chunk), but never a block the decode side already holds
            first = max(min(job.pushed_tokens, s.start) // bs, job.descriptor.num_cached_blocks)
            last = -(-end // bs)
            if first < last:
                kv = self.engine.read_kv(layer, s.request.block_ids[first:last])  # a copy: blocks may move on
                job.pusher.push(s.request.request_id, job.descriptor.secret, layer, list(job.descriptor.block_ids[first:last]), kv)
            if layer == self.num_layers - 1:
                job.pushed_tokens = end // bs * bs  # a partly filled block is sent again next chunk
                job.first_scheduled = job.first_scheduled or time.monotonic()

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if job is None or out.finish_reason != "prefill_done":
                continue
            first = FirstToken(out.token_ids[-1], out.logprobs[-1], tuple(out.top_logprobs[-1]))
            done = job.pusher.commit(out.request_id, job.descriptor.secret, first, job.num_prompt_tokens)
            done.add_done_callback(lambda f, out=out, first=first: self._committed(out, first, f))

    def _committed(self, out: RequestOutput, first: FirstToken, delivered: Future) -> None:
        """On a pusher thread: the commit went out (or failed). Free the blocks, answer."""
        rid = out.request_id
        self.loop.submit(lambda e: _release(e, rid))
        with self._lock:
            job = self._jobs.pop(rid, None)
        if job is None:
            return
        err = delivered.exception()
        if err is not None:
            job.future.set_exception(PrefillError(request_status(err), f"KV transfer to {job.descriptor.decode_worker_id} failed: {err}",
                                                  receiver_lost=isinstance(err, PeerUnavailableError)))
            return
        now = time.monotonic()
        started = job.first_scheduled or now
        job.future.set_result(PrefillResult(rid, first, out.num_cached_tokens, started - job.arrival, now - started))

    # ---- aborts and state ----------------------------------------------------------------
    def abort(self, request_id: str, reason: str = "aborted") -> bool:
        with self._lock:
            job = self._jobs.pop(request_id, None)
        found = self.loop.call(lambda e: _abort(e, request_id))
        if job is not None:
            job.pusher.abort(request_id, job.descriptor.secret, reason)
            if not job.future.done():
                job.future.set_exception(PrefillError("ABORTED", f"prefill of {request_id!r} aborted: {reason}"))
        return found or job is not None

    def _on_crash(self, exc: BaseException) -> None:
        with self._lock:
            jobs, self._jobs = self._jobs, {}
        for rid, job in jobs.items():
            job.pusher.abort(rid, job.descriptor.secret, "prefill engine failed")
            if not job.future.done():
                job.future.set_exception(PrefillError("INTERNAL", f"prefill engine failed: {exc}"))

    def stats(self) -> dict[str, int]:
        return self.loop.call(lambda e: e.stats())

    def close(self) -> None:
        self.loop.stop()
        self.pushers.close()


def check_descriptor(d: TransferDescriptor, num_prompt_tokens: int, block_size: int) -> None:
    blocks = -(-num_prompt_tokens // block_size)
    if len(d.block_ids) != blocks:
        raise PrefillError("INVALID_ARGUMENT", f"descriptor has {len(d.block_ids)} blocks for a prompt of {num_prompt_tokens} tokens (block size {block_size})")
    if not 0 <= d.num_cached_blocks <= min(blocks, num_prompt_tokens // block_size):
        raise PrefillError("INVALID_ARGUMENT", f"descriptor says {d.num_cached_blocks} blocks are cached on the decode side, of {blocks}")


def _release(engine: LLMEngine, request_id: str) -> None:
    try:
        engine.release(request_id)
    except UnknownRequestError:
        pass  # aborted meanwhile


def _abort(engine: LLMEngine, request_id: str) -> bool:
    try:
        engine.abort_request(request_id)
    except UnknownRequestError:
        return False
    return True
