"""The calls of one request's two legs, each with a deadline and each turning a gRPC failure
into a `LegError` that names the leg and the worker: reserve (decode side), prefill, the
decode stream, and aborts.

The decode stream is opened right after the reservation, before the prefill: while the
prefill runs, `prefill_watching` also watches the decode side, so a decode worker that dies
or drops the reservation (lease expired) ends the request at once instead of after the
prefill's deadline. `stream_disaggregated` chains the calls for one fixed pair (tests and
tools use it); the router's orchestrator chains the same calls with routing, retries and
metrics around them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto import worker_pb2, worker_pb2_grpc
from splitserve.proto.convert import params_to_proto
from splitserve.proto.server import OPTIONS, token_metadata
from splitserve.proto.status import StatusError

logger = logging.getLogger(__name__)
ABORT_TIMEOUT = 5.0
# When the decode side fails while a prefill is running, how long to wait for the prefill's own
# verdict: a prefill worker that died shows on both legs at once, and its error is the cause.
ROOT_CAUSE_GRACE = 2.0


class LegError(StatusError):
    """A leg's failure: `leg` ("prefill" | "decode") and `worker_id` say where it happened."""

    def __init__(self, status: str, message: str, leg: str, worker_id: str) -> None:
        super().__init__(status, message)
        self.leg, self.worker_id = leg, worker_id


class WorkerClient:
    """A channel to one worker with its stubs and the cluster token."""

    def __init__(self, address: str, token: str | None = None, worker_id: str = "") -> None:
        self.address = address
        self.worker_id = worker_id or address
        self.label = f"{worker_id} ({address})" if worker_id else address
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        self.metadata = token_metadata(token)
        self.prefill = worker_pb2_grpc.PrefillWorkerStub(self.channel)
        self.decode = worker_pb2_grpc.DecodeWorkerStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def error(self, e: grpc.RpcError, leg: str, what: str) -> LegError:
        code = e.code() if hasattr(e, "code") else None
        detail = e.details() if hasattr(e, "details") else str(e)
        return LegError(code.name if code is not None else "UNKNOWN", f"{what} on {leg} worker {self.label}: {detail}", leg, self.worker_id)

    # ---- decode side ---------------------------------------------------------------------
    def reserve(self, request_id: str, prompt: list[int], params: worker_pb2.SamplingParams, transport: str, timeout: float) -> worker_pb2.TransferDescriptor:
        req = worker_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, params=params, transport=transport)
        try:
            return self.decode.Reserve(req, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise self.error(e, "decode", "reserve") from None

    def open_decode(self, request_id: str, timeout: float) -> "DecodeStream":
        call = self.decode.Decode(worker_pb2.DecodeRequest(request_id=request_id), timeout=timeout, metadata=self.metadata)
        return DecodeStream(self, call)

    def abort_decode(self, request_id: str, reason: str) -> None:
        self._abort(self.decode, request_id, reason)

    # ---- prefill side --------------------------------------------------------------------
    def prefill_future(self, request_id: str, prompt: list[int], params: worker_pb2.SamplingParams,
                       descriptor: worker_pb2.TransferDescriptor, timeout: float) -> grpc.Future:
        req = worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, params=params, descriptor=descriptor)
        return self.prefill.Prefill.future(req, timeout=timeout, metadata=self.metadata)

    def abort_prefill(self, request_id: str, reason: str) -> None:
        self._abort(self.prefill, request_id, reason)

    def _abort(self, stub, request_id: str, reason: str) -> None:
        """Fire the abort and return: a stalled or dead worker must not hold up the client's
        answer (a worker that misses it still frees the request by its lease or its stream)."""
        call = stub.Abort.future(worker_pb2.AbortRequest(request_id=request_id, reason=reason), timeout=ABORT_TIMEOUT, metadata=self.metadata)

        def done(f: grpc.Future) -> None:
            if f.exception() is not None:
                logger.warning("abort of %s on %s failed: %s", request_id, self.label, f.code())

        call.add_done_callback(done)


class DecodeStream:
    """A request's token stream from its decode worker, opened before the KV arrives."""

    def __init__(self, worker: WorkerClient, call) -> None:
        self.worker = worker
        self.call = call

    def failure(self) -> LegError | None:
        """The decode leg's error if the stream has already ended in one."""
        if self.call.done() and self.call.code() is not grpc.StatusCode.OK:
            return self.worker.error(self.call, "decode", "decode")
        return None

    def __iter__(self) -> Iterator[worker_pb2.TokenChunk]:
        """Yield the decode worker's chunks; cancels the stream if the consumer leaves."""
        try:
            for chunk in self.call:
                yield chunk
                if chunk.finished:
                    return
        except grpc.RpcError as e:
            raise self.worker.error(e, "decode", "decode") from None
        finally:
            self.cancel()

    def cancel(self) -> None:
        self.call.cancel()  # no-op once finished; otherwise the decode side aborts the request


def prefill_watching(prefill: WorkerClient, stream: DecodeStream, request_id: str, prompt: list[int], params: worker_pb2.SamplingParams,
                     descriptor: worker_pb2.TransferDescriptor, timeout: float) -> worker_pb2.PrefillResponse:
    """Run the prefill leg while watching the decode leg; the first failure of either ends it."""
    future = prefill.prefill_future(request_id, prompt, params, descriptor, timeout)
    wake = threading.Event()
    future.add_done_callback(lambda _: wake.set())
    stream.call.add_done_callback(lambda _: wake.set())
    while not future.done():
        wake.wait()
        wake.clear()
        decode_failed = stream.failure()
        if decode_failed is not None and not future.done():
            end = time.monotonic() + ROOT_CAUSE_GRACE
            while not future.done() and time.monotonic() < end:
                wake.wait(max(0.0, end - time.monotonic()))
                wake.clear()
            if not future.done() or _succeeded(future):
                future.cancel()  # the prefill worker aborts the job when its call is cancelled
                raise decode_failed
    try:
        return future.result()
    except grpc.RpcError as e:
        raise prefill.error(e, "prefill", "prefill") from None


def _succeeded(future: grpc.Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


@dataclass
class RequestResult:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def stream_disaggregated(
    prefill: WorkerClient,
    decode: WorkerClient,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    *,
    transport: str = "",
    timeout: float = 60.0,
    timings: dict[str, float] | None = None,
) -> Iterator[worker_pb2.TokenChunk]:
    """Reserve -> Prefill -> Decode on one pair; yields the decode worker's chunks (the first
    holds the prefill's first token). A failed leg aborts the other."""
    t = timings if timings is not None else {}
    start = time.monotonic()
    deadline = start + timeout
    left = lambda: max(0.001, deadline - time.monotonic())  # noqa: E731
    p = params_to_proto(params)
    d = decode.reserve(request_id, prompt_token_ids, p, transport, left())
    t["reserve"] = time.monotonic() - start
    stream = decode.open_decode(request_id, left())
    try:
        pre = prefill_watching(prefill, stream, request_id, prompt_token_ids, p, d, left())
        t.update(prefill_queue=pre.queue_seconds, prefill=pre.prefill_seconds, ttft=time.monotonic() - start)
        yield from stream
    except LegError as e:
        stream.cancel()
        (prefill.abort_prefill if e.leg == "decode" else decode.abort_decode)(request_id, f"{e.leg} leg failed")
        raise
    t["e2e"] = time.monotonic() - start


def run_disaggregated(
    prefill: WorkerClient, decode: WorkerClient, request_id: str, prompt_token_ids: list[int], params: SamplingParams, **kw
) -> RequestResult:
    """Run the request to completion and return its tokens."""
    result = RequestResult(request_id)
    for chunk in stream_disaggregated(prefill, decode, request_id, prompt_token_ids, params, timings=result.timings, **kw):
        result.token_ids.extend(chunk.token_ids)
        result.logprobs.extend(chunk.logprobs)
        result.text += chunk.text
        if chunk.finished:
            result.finish_reason = chunk.finish_reason
    return result
