"""Running one request's two legs: Reserve on a decode worker, Prefill on a prefill worker,
then the decode stream. Every call has a deadline; when either leg fails the other is aborted
explicitly, and the caller gets one definite `StatusError`, never a hang.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from engine.sampling_params import SamplingParams
from proto import worker_pb2, worker_pb2_grpc
from proto.convert import descriptor_from_proto, params_to_proto
from proto.server import OPTIONS, token_metadata
from proto.status import StatusError

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
    """Yield the request's token chunks (the first holds the prefill's first token)."""
    t = timings if timings is not None else {}
    start = time.monotonic()
    deadline = start + timeout
    left = lambda: max(0.001, deadline - time.monotonic())  # noqa: E731
    p = params_to_proto(params)
    try:
        d = decode.decode.Reserve(
            worker_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, params=p, transport=transport),
            timeout=left(), metadata=decode.metadata,
        )
    except grpc.RpcError as e:
        raise StatusError.from_rpc(e, f"reserve on {decode.address}") from None
    t["reserve"] = time.monotonic() - start

    try:
        pre = prefill.prefill.Prefill(
            worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, params=p, descriptor=d),
            timeout=left(), metadata=prefill.metadata,
        )
    except grpc.RpcError as e:
        _abort(decode.decode, decode, request_id, "prefill leg failed")
        raise StatusError.from_rpc(e, f"prefill on {prefill.address}") from None
    t.update(prefill=time.monotonic() - start - t["reserve"], prefill_queue=pre.queue_seconds, prefill_compute=pre.prefill_seconds, ttft=time.monotonic() - start)

    stream = decode.decode.Decode(worker_pb2.DecodeRequest(request_id=request_id), timeout=left(), metadata=decode.metadata)
    try:
        for chunk in stream:
            yield chunk
            if chunk.finished:
                break
    except grpc.RpcError as e:
        _abort(prefill.prefill, prefill, request_id, "decode leg failed")
        raise StatusError.from_rpc(e, f"decode on {decode.address}") from None
    except GeneratorExit:  # the consumer left: cancel the stream so the decode side aborts
        stream.cancel()
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


def _abort(stub, client: WorkerClient, request_id: str, reason: str) -> None:
    try:
        stub.Abort(worker_pb2.AbortRequest(request_id=request_id, reason=reason), timeout=ABORT_TIMEOUT, metadata=client.metadata)
    except grpc.RpcError as e:  # the other leg may be gone; its own leases clean up
        logger.warning("abort of %s on %s failed: %s", request_id, client.address, e.code())
