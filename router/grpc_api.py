"""The router's public gRPC services on grpc.aio: Generation (streaming) and Admin (for the CLI).

Messages are converted here and nowhere else; errors become status codes through
proto.status; a caller that goes away aborts its request's two legs. The admin calls read and
write Redis on a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import grpc
import grpc.aio

from splitserve.cluster.registry import Registry, WorkerRecord
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto import public_pb2, public_pb2_grpc
from splitserve.proto.convert import processors_from_proto, top_to_proto
from splitserve.proto.status import StatusError, grpc_code
from splitserve.router.orchestrator import Chunk, GenerateInput, Orchestrator, timings_to_proto

logger = logging.getLogger(__name__)
API_KEY_HEADER = "authorization"
# A request id is logged, kept with its timings and sent to both workers: an id, not a payload.
MAX_REQUEST_ID_CHARS = 256
# A status message travels in a trailer, percent-encoded, and clients refuse trailers past 8 KiB
# (gRPC's default): one that quotes a caller's 10 KB model name would reach the caller as
# RESOURCE_EXHAUSTED instead of the status it is.
MAX_DETAILS_CHARS = 1000


def details(message: str) -> str:
    return message if len(message) <= MAX_DETAILS_CHARS else f"{message[:MAX_DETAILS_CHARS]}... ({len(message)} characters)"


def params_from_public(p: public_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=p.max_tokens or 16,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_k=p.top_k,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        skip_special_tokens=p.skip_special_tokens if p.HasField("skip_special_tokens") else True,
        **processors_from_proto(p),
    )


def chunk_to_public(c: Chunk) -> public_pb2.GenerateResponse:
    msg = public_pb2.GenerateResponse(
        request_id=c.request_id, token_ids=c.token_ids, logprobs=c.logprobs, text=c.text, finished=c.finished, finish_reason=c.finish_reason or "",
        top_logprobs=top_to_proto(c.top_logprobs, public_pb2.TopLogprobs),
    )
    if c.usage is not None:
        msg.usage.CopyFrom(public_pb2.Usage(**c.usage))
    if c.timings is not None:
        msg.timings.CopyFrom(timings_to_proto(c.timings))
    return msg


async def check_api_key(context: grpc.aio.ServicerContext, api_keys: frozenset[str], others: frozenset[str] = frozenset(), what: str = "") -> None:
    """The call's key must be one of `api_keys` (none configured: any call passes). A key of
    `others` (valid elsewhere) is PERMISSION_DENIED, naming `what` it may not call."""
    if not api_keys:
        return
    meta = dict(context.invocation_metadata() or ())
    key = meta.get(API_KEY_HEADER, "").removeprefix("Bearer ").strip()
    if key in api_keys:
        return
    if key in others:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this API key may not call {what}: it needs one of the cluster's admin_keys")
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key (send 'authorization: Bearer KEY')")


class GenerationService(public_pb2_grpc.GenerationServicer):
    """`send_timeout`: how long a response may wait for a caller that reads nothing (HTTP/2 flow
    control holds the write) before its request is aborted as if the caller had left, freeing
    its slot on the router and both legs; else a stalled reader would hold them as long as it
    likes. The call itself ends DEADLINE_EXCEEDED once the caller reads again (grpc.aio cannot
    end a call whose write is pending)."""

    def __init__(self, orchestrator: Orchestrator, api_keys: frozenset[str], send_timeout: float | None = None) -> None:
        self.orch = orchestrator
        self.api_keys = api_keys
        self.send_timeout = send_timeout

    async def Generate(self, request: public_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        await check_api_key(context, self.api_keys)
        kind = request.WhichOneof("prompt")
        prompt = request.text if kind == "text" else list(request.token_ids.ids) if kind == "token_ids" else ""
        failed: Exception | None = None
        try:
            if len(request.request_id) > MAX_REQUEST_ID_CHARS:
                raise InvalidRequestError("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(request.request_id)}")
            slos = {f: getattr(request, f) for f in ("slo_ttft_ms", "slo_tpot_ms") if request.HasField(f)}
            prompt = await self.orch.encoded(prompt)
            stream = self.orch.generate(GenerateInput(prompt, params_from_public(request.params), request.request_id, request.model, **slos))
        except Exception as e:
            failed, stream = e, None
        if stream is not None:
            dropped: list[bool] = []
            try:
                async for chunk in stream:  # a caller that leaves cancels this task: the stream aborts both legs
                    watch = self._watch_write(stream, dropped)
                    try:
                        yield chunk_to_public(chunk)  # resumed once the message is written
                    finally:  # a caller that leaves meanwhile cancels this task here: the watch goes too
                        if watch is not None:
                            watch.cancel()
                    if dropped:
                        raise StatusError("DEADLINE_EXCEEDED", f"the caller read nothing for {self.send_timeout:g} s; its request was aborted")
            except Exception as e:
                failed = e
            finally:
                await stream.aclose()
        if failed is not None:
            if getattr(failed, "retry_after", None):
                context.set_trailing_metadata((("retry-after", str(math.ceil(failed.retry_after))),))
            await context.abort(grpc_code(failed), details(str(failed)))

    def _watch_write(self, stream, dropped: list[bool]) -> asyncio.TimerHandle | None:
        """Abort the request if this write is still waiting after `send_timeout`."""
        if self.send_timeout is None:
            return None

        def drop() -> None:
            logger.warning("aborting a request whose gRPC caller read nothing for %g s", self.send_timeout)
            dropped.append(True)
            asyncio.ensure_future(_close(stream))

        return asyncio.get_running_loop().call_later(self.send_timeout, drop)

    async def Abort(self, request: public_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> public_pb2.AbortResponse:
        await check_api_key(context, self.api_keys)
        return public_pb2.AbortResponse(found=self.orch.abort(request.request_id))

    async def GetTimings(self, request: public_pb2.TimingsRequest, context: grpc.aio.ServicerContext) -> public_pb2.Timings:
        await check_api_key(context, self.api_keys)
        t = self.orch.timings(request.request_id)
        if t is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, details(f"no timings for request {request.request_id!r} (unknown, running, or too old)"))
        return timings_to_proto(t)


async def _close(stream) -> None:
    with contextlib.suppress(RuntimeError):  # running again (the write went through): the servicer stops it
        await stream.aclose()


def worker_info(r: WorkerRecord, now: float) -> public_pb2.WorkerInfo:
    s = r.load
    return public_pb2.WorkerInfo(
        worker_id=r.worker_id, role=r.role, state=r.state, address=r.address, running=s.get("running", 0), waiting=s.get("waiting", 0),
        queued_prefill_tokens=s.get("queued_prefill_tokens", 0), used_blocks=s.get("used_blocks", 0), free_blocks=s.get("free_blocks", 0),
        reserved_blocks=s.get("reserved_blocks", 0), total_blocks=s.get("total_blocks", 0), heartbeat_age=max(0.0, now - r.heartbeat), restarts=r.restarts, pid=r.pid,
    )


class AdminService(public_pb2_grpc.AdminServicer):
    """Reads and writes the cluster's desired state in Redis; the controller acts on it."""

    def __init__(self, registry: Registry, cluster: str, model: str, admin_keys: frozenset[str], api_keys: frozenset[str] = frozenset(),
                 max_replicas: int = 64) -> None:
        """`admin_keys`: the keys these calls take (none: any call passes); `api_keys`: keys of
        the inference APIs, refused here as PERMISSION_DENIED rather than unknown."""
        self.registry = registry
        self.cluster = cluster
        self.model = model
        self.admin_keys, self.api_keys = admin_keys, api_keys - admin_keys
        self.max_replicas = max_replicas

    async def _check_key(self, context: grpc.aio.ServicerContext) -> None:
        await check_api_key(context, self.admin_keys, self.api_keys, "the Admin API")

    async def _redis(self, context: grpc.aio.ServicerContext, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, details(f"registry unreachable: {e}"))

    async def Status(self, request, context) -> public_pb2.ClusterStatus:
        await self._check_key(context)
        now = time.time()
        workers = await self._redis(context, self.registry.workers)
        targets = await self._redis(context, self.registry.targets)
        return public_pb2.ClusterStatus(cluster=self.cluster, model=self.model, workers=[worker_info(w, now) for w in workers], targets=targets)

    async def Scale(self, request: public_pb2.ScaleRequest, context) -> public_pb2.ClusterStatus:
        await self._check_key(context)
        asked = {role: getattr(request, role) for role in ("prefill", "decode") if request.HasField(role)}
        for role, n in asked.items():  # all checked before any is set
            if not 0 <= n <= self.max_replicas:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{role}: replicas must be in [0, {self.max_replicas}] (max_replicas), got {n}")
        for role, n in asked.items():
            await self._redis(context, self.registry.set_target, role, n)
        return await self.Status(public_pb2.StatusRequest(), context)

    async def Drain(self, request: public_pb2.DrainRequest, context) -> public_pb2.DrainResponse:
        await self._check_key(context)
        workers = await self._redis(context, self.registry.workers)
        record = next((w for w in workers if w.worker_id == request.worker_id), None)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, details(f"worker_id: no worker {request.worker_id!r} in cluster {self.cluster!r}"))
        await self._redis(context, self.registry.drain_one, record.worker_id, record.role)  # once per worker: not replaced
        return public_pb2.DrainResponse(found=True)

    async def Shutdown(self, request, context) -> public_pb2.ShutdownResponse:
        await self._check_key(context)
        for role in ("prefill", "decode"):
            await self._redis(context, self.registry.set_target, role, 0)
        return public_pb2.ShutdownResponse()
