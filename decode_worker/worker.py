"""The decode worker's core, free of gRPC: reservations, KV landing, token streams.

A request's journey here:
    reserve()   the prompt's cached prefix pinned, the other blocks allocated, a transfer entry
                RESERVED for those (only they are sent) under a lease, a stream opened
    KV payloads (any transport) land in the blocks; the commit carries the first token
    transfer COMPLETE  -> admitted into the running batch (engine.admit_prefilled), tokens flow
    transfer FAILED / EXPIRED -> blocks freed, the stream ends with that status
    abort()     at any point: transfer failed or request aborted, blocks freed, stream ended
Selective disaggregation skips the transfer: generate() adds the request to the engine as a
whole (its prefix cache supplies most of the prompt's KV) and its tokens flow the same way.
Every engine call runs on the engine loop thread; transports only write into reserved blocks.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field

from splitserve.engine.engine import LLMEngine, RequestOutput
from splitserve.engine.engine_loop import EngineLoop
from splitserve.engine.errors import UnknownRequestError
from splitserve.engine.prompt import check_token_ids
from splitserve.engine.sampling_params import SamplingParams, TopLogprobs
from splitserve.kv_transfer.connect import TRANSPORTS
from splitserve.kv_transfer.layout import KVLayout, TransferDescriptor
from splitserve.kv_transfer.local import LocalHub
from splitserve.kv_transfer.receiver import KVReceiver, TensorKVStore
from splitserve.kv_transfer.state import Transfer, TransferState, TransferTable
from splitserve.kv_transfer.torch_transport import TorchKVServer
from splitserve.proto.status import StatusError

logger = logging.getLogger(__name__)
ENDED_STREAM_TTL = 60.0


class DecodeError(StatusError):
    """A request's decode leg ended without finishing; `status` says how."""


@dataclass
class TokenChunk:
    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    kv_transfer_seconds: float = 0.0  # first chunk only
    kv_bytes: int = 0  # first chunk only
    num_cached_tokens: int = 0  # first chunk only
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per token, when the request asked for them


@dataclass
class _Stream:
    prompt_token_ids: list[int]
    params: SamplingParams
    output_prefix: list[int] = field(default_factory=list)  # a continuation's tokens from before: not sent again
    chunks: "queue.Queue[TokenChunk | DecodeError]" = field(default_factory=queue.Queue)
    text_sent: int = 0
    tokens_sent: int = 0
    first_sent: bool = False
    ended_at: float | None = None  # kept this long after the end so a late reader learns why
    kv_transfer_seconds: float = 0.0
    kv_bytes: int = 0


class DecodeWorker:
    def __init__(
        self,
        engine: LLMEngine,
        worker_id: str,
        *,
        host: str = "127.0.0.1",
        transports: tuple[str, ...] = ("grpc", "torch"),
        default_transport: str = "grpc",
        lease_seconds: float = 30.0,
        hub: LocalHub | None = None,
    ) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.transports = transports
        self.default_transport = default_transport
        self.layout = KVLayout.from_dict(engine.kv_layout)
        self.vocab_size = engine.model_config.vocab_size
        self.table = TransferTable(engine.model_config.num_layers, self._on_transfer_done)
        self.receiver = KVReceiver(worker_id, self.layout, self.table, TensorKVStore(engine.runner.kv_cache), engine.config.device)
        self.torch_server = TorchKVServer(self.receiver, host, engine.config.device) if "torch" in transports else None
        self.hub = hub
        self.endpoints: dict[str, str] = {}
        if hub is not None and "local" in transports:
            self.endpoints["local"] = hub.register(self.receiver)
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self.accepting = True  # False once draining: running requests finish, no new ones
        self.loop = EngineLoop(engine, self._on_outputs, idle_hook=self._housekeeping, on_crash=self._on_crash, name=f"decode-{worker_id}")
        self.loop.start()
        self.kv_events = self.loop.kv_events  # what this worker's prefix cache gained and lost

    def set_rpc_endpoint(self, address: str) -> None:
        """The worker's gRPC address, which the grpc and torch transports handshake with."""
        for t in ("grpc", "torch"):
            if t in self.transports:
                self.endpoints[t] = address

    # ---- reservations --------------------------------------------------------------------
    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, transport: str = "", lease_seconds: float = 0.0,
                output_prefix: list[int] = ()) -> TransferDescriptor:
        transport = transport or self.default_transport
        if transport not in self.endpoints:
            raise DecodeError("FAILED_PRECONDITION", f"transport {transport!r} is not enabled on decode worker {self.worker_id} (enabled: {sorted(self.endpoints)}; known: {TRANSPORTS})")
        lease = lease_seconds or self.lease_seconds
        check_token_ids(params, self.vocab_size)  # the engine samples them after the transfer: refuse bad ones now
        self._open_stream(request_id, prompt_token_ids, params, output_prefix)
        try:
            r = self.loop.call(lambda e: e.reserve(request_id, prompt_token_ids, params.max_tokens, output_prefix))
            # the blocks this worker's prefix cache already holds are not sent again
            secret = secrets.token_hex(16)  # this reservation's: only the prefill worker the router hands it to can fill it
            self.table.reserve(request_id, r.block_ids[r.num_cached_blocks:], len(prompt_token_ids) + len(output_prefix), lease, secret)
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        return TransferDescriptor(request_id, tuple(r.block_ids), transport, self.endpoints[transport], self.layout, time.time() + lease,
                                  self.worker_id, r.num_cached_blocks, secret)

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, output_prefix: list[int] = ()) -> None:
        """Take the whole request: prefill it here, then decode; read it with `stream()`."""
        self._open_stream(request_id, prompt_token_ids, params, output_prefix)
        try:
            self.loop.call(lambda e: e.add_request(request_id, prompt_token_ids, params, output_prefix=output_prefix))
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise

    def _open_stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, output_prefix: list[int] = ()) -> None:
        if not self.accepting:
            raise DecodeError("UNAVAILABLE", f"decode worker {self.worker_id} is draining")
        with self._lock:
            live = self._streams.get(request_id)
            if live is not None and live.ended_at is None:
                raise DecodeError("ALREADY_EXISTS", f"request {request_id!r} is already on {self.worker_id}")
            self._streams[request_id] = _Stream(list(prompt_token_ids), params, list(output_prefix), tokens_sent=len(output_prefix))

    def _on_transfer_done(self, t: Transfer) -> None:
        """A transfer reached a final state (on a transport or the loop thread)."""
        self.loop.submit(lambda engine: self._land(engine, t))

    def _land(self, engine: LLMEngine, t: Transfer) -> None:
        self.table.pop(t.request_id)
        with self._lock:
            stream = self._streams.get(t.request_id)
        if t.state is TransferState.COMPLETE and stream is not None:
            stream.kv_transfer_seconds = (t.finished or 0.0) - (t.first_payload or t.finished or 0.0)
            stream.kv_bytes = t.bytes_received
            first = t.first
            out = engine.admit_prefilled(t.request_id, stream.prompt_token_ids, first.token, stream.params, first.logprob, stream.output_prefix,
                                         first.top_logprobs)
            self._on_outputs([out])
            return
        try:
            engine.abort_request(t.request_id)
        except UnknownRequestError:
            pass
        self._end(t.request_id, DecodeError(t.status or "ABORTED", f"KV transfer {t.state.value}: {t.reason}"))

    # ---- streams -------------------------------------------------------------------------
    def stream(self, request_id: str, timeout: float):
        """Yield the request's TokenChunks until it finishes; raises DecodeError on failure."""
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            raise DecodeError("NOT_FOUND", f"no reservation for request {request_id!r} on {self.worker_id}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = stream.chunks.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.abort(request_id, "decode deadline exceeded")
                raise DecodeError("DEADLINE_EXCEEDED", f"request {request_id!r} did not finish within {timeout:g} s") from None
            if isinstance(item, DecodeError) or item.finished:
                with self._lock:
                    self._streams.pop(request_id, None)
            if isinstance(item, DecodeError):
                raise item
            yield item
            if item.finished:
                return

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                stream = self._streams.get(out.request_id)
            if stream is None or stream.ended_at is not None:
                continue
            new_tokens = out.token_ids[stream.tokens_sent :]
            chunk = TokenChunk(out.request_id, new_tokens, out.logprobs[stream.tokens_sent :], out.text[stream.text_sent :],
                               out.finished, out.finish_reason, len(out.prompt_token_ids), top_logprobs=out.top_logprobs[stream.tokens_sent :])
            if not stream.first_sent:
                stream.first_sent = True
                chunk.kv_transfer_seconds, chunk.kv_bytes = stream.kv_transfer_seconds, stream.kv_bytes
                chunk.num_cached_tokens = out.num_cached_tokens
            stream.tokens_sent, stream.text_sent = len(out.token_ids), len(out.text)
            if out.finished:
                self._end(out.request_id, chunk)
            else:
                stream.chunks.put(chunk)

    def _end(self, request_id: str, last: "TokenChunk | DecodeError") -> None:
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None or stream.ended_at is not None:
                return
            stream.ended_at = time.monotonic()
        stream.chunks.put(last)

    def _housekeeping(self) -> None:
        """On the loop thread between steps: expire leases, forget ended streams nobody read."""
        self.table.expire()
        cutoff = time.monotonic() - ENDED_STREAM_TTL
        with self._lock:
            for rid in [r for r, st in self._streams.items() if st.ended_at is not None and st.ended_at < cutoff]:
                del self._streams[rid]

    # ---- aborts and state ----------------------------------------------------------------
    def abort(self, request_id: str, reason: str = "aborted") -> bool:
        """Abort wherever the request is; True if it was known."""
        if self.table.fail(request_id, reason):
            return True  # _land frees the blocks and ends the stream
        with self._lock:
            stream = self._streams.get(request_id)
            known = stream is not None and stream.ended_at is None

        def abort_in_engine(engine: LLMEngine) -> bool:
            try:
                engine.abort_request(request_id)
            except UnknownRequestError:
                return False
            return True

        found = self.loop.call(abort_in_engine)
        self._end(request_id, DecodeError("ABORTED", f"request {request_id!r} aborted: {reason}"))
        return found or known

    def _on_crash(self, exc: BaseException) -> None:
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self._end(rid, DecodeError("INTERNAL", f"decode engine failed: {exc}"))

    def stats(self) -> dict[str, int]:
        s = self.loop.call(lambda e: e.stats())
        s["active_transfers"] = self.table.active()
        s["kv_bytes_received"] = self.table.bytes_received_total
        return s

    def close(self) -> None:
        if self.hub is not None:
            self.hub.unregister(self.worker_id)
        self.loop.stop()
