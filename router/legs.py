"""The calls of one request's two legs, each with a deadline and each turning a gRPC failure
into a `StatusError`: reserve (decode side), prefill, the decode stream, and aborts.

`stream_disaggregated` chains them for one fixed pair (tests and tools use it); the router's
orchestrator chains the same calls with routing, retries and metrics around them.
"""

from __future__ import annotations

import logging
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


class WorkerClient:
    """A channel to one worker with its stubs and the cluster token."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        self.metadata = token_metadata(token)
        self.prefill = worker_pb2_grpc.PrefillWorkerStub(self.channel)
        self.decode = worker_pb2_grpc.DecodeWorkerStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    # ---- decode side ---------------------------------------------------------------------
    def reserve(self, request_id: str, prompt: list[int], params: worker_pb2.SamplingParams, transport: str, timeout: float) -> worker_pb2.TransferDescriptor:
        req = worker_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, params=params, transport=transport)
        try:
            return self.decode.Reserve(req, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise StatusError.from_rpc(e, f"reserve on {self.address}") from None

    def decode_stream(self, request_id: str, timeout: float) -> Iterator[worker_pb2.TokenChunk]:
        """Yield the decode worker's chunks; cancels the stream if the consumer leaves."""
        stream = self.decode.Decode(worker_pb2.DecodeRequest(request_id=request_id), timeout=timeout, metadata=self.metadata)
        try:
            for chunk in stream:
                yield chunk
                if chunk.finished:
                    return
        except grpc.RpcError as e:
            raise StatusError.from_rpc(e, f"decode on {self.address}") from None
        finally:
            stream.cancel()  # no-op once finished; otherwise the decode side aborts the request

    def abort_decode(self, request_id: str, reason: str) -> None:
        self._abort(self.decode, request_id, reason)

    # ---- prefill side --------------------------------------------------------------------
    def prefill_call(self, request_id: str, prompt: list[int], params: worker_pb2.SamplingParams, descriptor: worker_pb2.TransferDescriptor, timeout: float) -> worker_pb2.PrefillResponse:
        req = worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, params=params, descriptor=descriptor)
        try:
            return self.prefill.Prefill(req, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise StatusError.from_rpc(e, f"prefill on {self.address}") from None

    def abort_prefill(self, request_id: str, reason: str) -> None:
        self._abort(self.prefill, request_id, reason)

    def _abort(self, stub, request_id: str, reason: str) -> None:
        try:
            stub.Abort(worker_pb2.AbortRequest(request_id=request_id, reason=reason), timeout=ABORT_TIMEOUT, metadata=self.metadata)
        except grpc.RpcError as e:  # the leg may be gone; its own leases clean up
            logger.warning("abort of %s on %s failed: %s", request_id, self.address, e.code())


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
    try:
        pre = prefill.prefill_call(request_id, prompt_token_ids, p, d, left())
    except StatusError:
        decode.abort_decode(request_id, "prefill leg failed")
        raise
    t.update(prefill_queue=pre.queue_seconds, prefill=pre.prefill_seconds, ttft=time.monotonic() - start)
    try:
        yield from decode.decode_stream(request_id, left())
    except StatusError:
        prefill.abort_prefill(request_id, "decode leg failed")
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
