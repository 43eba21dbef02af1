"""The calls of one request's two legs, on grpc.aio, each with a deadline and each turning a
gRPC failure into a `LegError` that names the leg and the worker: reserve (decode side),
prefill, the decode stream, and aborts.

The decode stream is opened right after the reservation, before the prefill: while the
prefill runs, `prefill_watching` also watches the decode side, so a decode worker that dies
or drops the reservation (lease expired) ends the request at once instead of after the
prefill's deadline. `stream_disaggregated` chains the calls for one fixed pair;
`run_disaggregated` is its blocking form for tools and tests. The router's orchestrator
chains the same calls with routing, retries and metrics around them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import grpc.aio

from splitserve.engine.sampling_params import SamplingParams, TopLogprobs
from splitserve.proto import worker_pb2, worker_pb2_grpc
from splitserve.proto.convert import params_to_proto, top_from_proto
from splitserve.proto.server import CHANNEL_OPTIONS, token_metadata
from splitserve.proto.status import RECEIVER_LOST, StatusError
from splitserve.proto.tls import TLSFiles, aio_channel

logger = logging.getLogger(__name__)
ABORT_TIMEOUT = 5.0
# When the decode side fails while a prefill is running, how long to wait for the prefill's own
# verdict: a prefill worker that died shows on both legs at once, and its error is the cause.
ROOT_CAUSE_GRACE = 2.0
# A worker's connection lost mid-call shows as one of these; the client is told UNAVAILABLE.
_LOST = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}


class LegError(StatusError):
    """A leg's failure: `leg` ("prefill" | "decode") and `worker_id` say where it happened."""

    def __init__(self, status: str, message: str, leg: str, worker_id: str) -> None:
        super().__init__(status, message)
        self.leg, self.worker_id = leg, worker_id


class WorkerClient:
    """An asyncio channel to one worker (over TLS when the cluster has it) with its stubs and the
    cluster token. Create it on the event loop that will use it."""

    def __init__(self, address: str, token: str | None = None, worker_id: str = "", tls: TLSFiles | None = None) -> None:
        self.address = address
        self.worker_id = worker_id or address
        self.label = f"{worker_id} ({address})" if worker_id else address
        self.channel = aio_channel(address, tls, CHANNEL_OPTIONS)
        self.metadata = token_metadata(token)
        self.prefill = worker_pb2_grpc.PrefillWorkerStub(self.channel)
        self.decode = worker_pb2_grpc.DecodeWorkerStub(self.channel)
        self._aborts: set[asyncio.Task] = set()

    async def close(self) -> None:
        await self.channel.close()

    def error(self, code: grpc.StatusCode | None, detail: str, leg: str, what: str) -> LegError:
        status = "UNAVAILABLE" if code in _LOST else code.name if code is not None else "UNAVAILABLE"
        if status in ("UNAUTHENTICATED", "PERMISSION_DENIED"):  # the worker refused this router, not the client
            status, detail = "INTERNAL", f"{detail} (the router's cluster_token is refused: routers and workers must share one)"
        return LegError(status, f"{what} on {leg} worker {self.label}: {detail}", leg, self.worker_id)

    def rpc_error(self, e: grpc.aio.AioRpcError, leg: str, what: str) -> LegError:
        return self.error(e.code(), e.details() or "", leg, what)

    # ---- decode side ---------------------------------------------------------------------
    async def reserve(self, request_id: str, prompt: list[int], params: worker_pb2.SamplingParams, transport: str,
                      timeout: float, output_prefix: list[int] = ()) -> worker_pb2.TransferDescriptor:
        req = worker_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, params=params, transport=transport,
                                        output_prefix=output_prefix)
        try:
            return await self.decode.Reserve(req, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            raise self.rpc_error(e, "decode", "reserve") from None

    def open_decode(self, request_id: str, timeout: float) -> "DecodeStream":
        call = self.decode.Decode(worker_pb2.DecodeRequest(request_id=request_id), timeout=timeout, metadata=self.metadata)
        return DecodeStream(self, call)

    def open_generate(self, request_id: str, prompt: list[int], params: worker_pb2.SamplingParams, timeout: float,
                      output_prefix: list[int] = ()) -> "DecodeStream":
        """Selective disaggregation: the decode worker prefills the prompt itself."""
        req = worker_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, params=params, output_prefix=output_prefix)
        return DecodeStream(self, self.decode.Generate(req, timeout=timeout, metadata=self.metadata))

    def abort_decode(self, request_id: str, reason: str) -> None:
        self._abort(self.decode, request_id, reason)

    # ---- prefill side --------------------------------------------------------------------
    def start_prefill(self, request_id: str, prompt: list[int], params: worker_pb2.SamplingParams,
                      descriptor: worker_pb2.TransferDescriptor, timeout: float, output_prefix: list[int] = ()) -> grpc.aio.UnaryUnaryCall:
        req = worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, params=params, descriptor=descriptor,
                                        output_prefix=output_prefix)
        return self.prefill.Prefill(req, timeout=timeout, metadata=self.metadata)

    def abort_prefill(self, request_id: str, reason: str) -> None:
        self._abort(self.prefill, request_id, reason)

    def _abort(self, stub, request_id: str, reason: str) -> None:
        """Send the abort and return: a stalled or dead worker must not hold up the client's
        answer (a worker that misses it still frees the request by its lease or its stream)."""

        async def send() -> None:
            try:
                await stub.Abort(worker_pb2.AbortRequest(request_id=request_id, reason=reason), timeout=ABORT_TIMEOUT, metadata=self.metadata)
            except grpc.aio.AioRpcError as e:
                logger.warning("abort of %s on %s failed: %s", request_id, self.label, e.code())

        task = asyncio.get_running_loop().create_task(send())
        self._aborts.add(task)  # keep a reference until it is done
        task.add_done_callback(self._aborts.discard)


class DecodeStream:
    """A request's token stream from its decode worker, opened before the KV arrives."""

    def __init__(self, worker: WorkerClient, call: grpc.aio.UnaryStreamCall) -> None:
        self.worker = worker
        self.call = call
        self.ended = asyncio.get_running_loop().create_future()  # set when the call terminates
        call.add_done_callback(lambda _: self.ended.done() or self.ended.set_result(None))

    async def failure(self) -> LegError | None:
        """The decode leg's error if the stream has already ended in one."""
        if not self.call.done():
            return None
        code = await self.call.code()
        if code is grpc.StatusCode.OK:
            return None
        return self.worker.error(code, await self.call.details(), "decode", "decode")

    async def __aiter__(self) -> AsyncIterator[worker_pb2.TokenChunk]:
        """Yield the decode worker's chunks; cancels the stream if the consumer leaves."""
        try:
            while (chunk := await self._read()) is not None:
                yield chunk
                if chunk.finished:
                    return
        finally:
            self.cancel()

    async def first(self) -> worker_pb2.TokenChunk:
        """The first chunk (a failure before it raises here, where it can still be retried)."""
        chunk = await self._read()
        if chunk is None:
            raise self.worker.error(grpc.StatusCode.UNAVAILABLE, "the stream ended before its first token", "decode", "generate")
        return chunk

    async def after(self, head: worker_pb2.TokenChunk) -> AsyncIterator[worker_pb2.TokenChunk]:
        """`head` (read with `first`), then the rest of the stream."""
        yield head
        if not head.finished:
            async for chunk in self:
                yield chunk
        else:
            self.cancel()

    async def _read(self) -> worker_pb2.TokenChunk | None:
        try:
            chunk = await self.call.read()
        except grpc.aio.AioRpcError as e:
            raise self.worker.rpc_error(e, "decode", "decode") from None
        return None if chunk is grpc.aio.EOF else chunk

    def cancel(self) -> None:
        self.call.cancel()  # no-op once finished; otherwise the decode side aborts the request


async def prefill_watching(prefill: WorkerClient, stream: DecodeStream, request_id: str, prompt: list[int], params: worker_pb2.SamplingParams,
                           descriptor: worker_pb2.TransferDescriptor, timeout: float, output_prefix: list[int] = ()) -> worker_pb2.PrefillResponse:
    """Run the prefill leg while watching the decode leg; the first failure of either ends it."""
    end = time.monotonic() + timeout
    call = prefill.start_prefill(request_id, prompt, params, descriptor, timeout, output_prefix)
    result = asyncio.ensure_future(_result(call))
    try:
        done, _ = await asyncio.wait({result, stream.ended}, return_when=asyncio.FIRST_COMPLETED)
        if result not in done and (decode_failed := await stream.failure()) is not None:
            # a prefill worker that died breaks both legs: prefer its own error, the cause
            done, _ = await asyncio.wait({result}, timeout=ROOT_CAUSE_GRACE)
            if result not in done or result.exception() is None:
                call.cancel()  # the prefill worker aborts the job when its call is cancelled
                if result not in done and decode_failed.status == "DEADLINE_EXCEEDED" and time.monotonic() < end - ROOT_CAUSE_GRACE:
                    # the decode worker's lease ran out, not the request's time: the prefill worker
                    # (stalled, or queued too long) is what failed, and another may serve it
                    detail = f"no KV reached decode worker {stream.worker.label} within its lease ({decode_failed})"
                    raise prefill.error(grpc.StatusCode.UNAVAILABLE, detail, "prefill", "prefill") from None
                raise decode_failed
        try:
            return await result
        except grpc.aio.AioRpcError as e:
            if any(k == RECEIVER_LOST for k, _ in e.trailing_metadata() or ()):  # the decode worker is what failed
                raise stream.worker.error(e.code(), f"{e.details()} (reported by prefill worker {prefill.label})", "decode", "KV transfer") from None
            raise prefill.rpc_error(e, "prefill", "prefill") from None
    finally:
        if not result.done():  # we were cancelled (the client left): so is the prefill call
            call.cancel()
            result.cancel()


async def _result(call: grpc.aio.UnaryUnaryCall):
    return await call


@dataclass
class RequestResult:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


async def stream_disaggregated(
    prefill: WorkerClient,
    decode: WorkerClient,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    *,
    transport: str = "",
    timeout: float = 60.0,
    timings: dict[str, float] | None = None,
) -> AsyncIterator[worker_pb2.TokenChunk]:
    """Reserve -> Prefill -> Decode on one pair; yields the decode worker's chunks (the first
    holds the prefill's first token). A failed leg aborts the other."""
    t = timings if timings is not None else {}
    start = time.monotonic()
    deadline = start + timeout
    left = lambda: max(0.001, deadline - time.monotonic())  # noqa: E731
    p = params_to_proto(params)
    d = await decode.reserve(request_id, prompt_token_ids, p, transport, left())
    t["reserve"] = time.monotonic() - start
    stream = decode.open_decode(request_id, left())
    try:
        pre = await prefill_watching(prefill, stream, request_id, prompt_token_ids, p, d, left())
        t.update(prefill_queue=pre.queue_seconds, prefill=pre.prefill_seconds, ttft=time.monotonic() - start)
        async for chunk in stream:
            yield chunk
    except LegError as e:
        stream.cancel()
        (prefill.abort_prefill if e.leg == "decode" else decode.abort_decode)(request_id, f"{e.leg} leg failed")
        raise
    t["e2e"] = time.monotonic() - start


def run_disaggregated(prefill: str, decode: str, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                      token: str | None = None, tls: TLSFiles | None = None, **kw) -> RequestResult:
    """Blocking: run one request on the workers at these addresses to completion."""

    async def run() -> RequestResult:
        p, d = WorkerClient(prefill, token, tls=tls), WorkerClient(decode, token, tls=tls)
        result = RequestResult(request_id)
        try:
            async for chunk in stream_disaggregated(p, d, request_id, prompt_token_ids, params, timings=result.timings, **kw):
                result.token_ids.extend(chunk.token_ids)
                result.logprobs.extend(chunk.logprobs)
                result.top_logprobs.extend(top_from_proto(chunk.top_logprobs))
                result.text += chunk.text
                if chunk.finished:
                    result.finish_reason = chunk.finish_reason
        finally:
            await asyncio.sleep(0)  # let fire-and-forget aborts go out before the channels close
            await asyncio.gather(*p._aborts, *d._aborts, return_exceptions=True)
            await p.close()
            await d.close()
        return result

    return asyncio.run(run())
