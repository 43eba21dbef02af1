"""gRPC transport: KV payloads as a client stream, one stream per request.

Works across any network (the fallback when torch.distributed cannot connect). The receiver
copies each payload's bytes straight into the reserved blocks (or one staging tensor when the
blocks are not contiguous). The stream's result confirms the commit, so the sender knows the
KV landed; a stream that breaks fails its request on both sides.

Two methods carry the same conversation. `KVBytes/Push` (the one senders use) is a stream of
raw byte strings with identity (de)serializers: each control message (payload header,
commit, abort) is a serialized `KVMessage` whose payload has no data, and a payload header is
followed by one message holding the payload's bytes as they are, so KV bytes are never copied
into or out of a protobuf. `KVTransfer/Push` (the .proto's method, with the bytes inside
`KVPayload.data`) stays for peers that lack the raw method; a sender falls back to it when
the raw method is UNIMPLEMENTED. `add_kv_transfer_service` registers both.

What limits the raw stream (measured, 512 MiB on 2 cores; raw gloo 2.8-4 GB/s): gRPC Python
itself. With no tensor, no cache and no protocol of ours (prebuilt bytes, thrown away on
arrival), grpcio moves 1.0-1.7 GB/s on one host and 1.8-2.5 on another; this transport reaches
0.9-1.1 and 1.3-1.8 there. On the receiver every message is copied out of gRPC's buffers by the
server's one completion-queue thread while it holds the GIL, twice when the message arrived in
more than one read (reads stop at 4 MiB in grpcio 1.85, whatever the read-size options say, so
8 MiB payloads always do; smaller messages cost more per message than the copy saves); on the
sender grpcio copies each message into a slice, and this transport copies the tensor into bytes
before and the bytes into the cache after. gloo copies none of them. Removing this transport's
sender copy (payload tensors backed by the bytes object) measured no faster: the two cores are
spent on five to seven copies of every byte where gloo makes two. Each of those buffers is a fresh multi-MiB allocation: with
glibc's defaults it is mmapped or trimmed back to the OS when freed, so the next one page-faults
in zeroed memory (~30 % of the receiver's CPU, 90,000 faults per 512 MiB); `keep_freed_buffers`
makes such buffers reusable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import queue
from collections.abc import Callable, Iterator

import grpc
import torch
from google.protobuf.message import DecodeError

from splitserve.kv_transfer.errors import (
    HandshakeError,
    HandshakeRefusedError,
    PayloadError,
    PeerUnavailableError,
    TransferError,
)
from splitserve.kv_transfer.layout import FirstToken, KVLayout
from splitserve.kv_transfer.receiver import KVReceiver
from splitserve.kv_transfer.sender import KVSender
from splitserve.kv_transfer.wire import PayloadHeader, copy_bytes_into, to_bytes
from splitserve.proto import kv_pb2, kv_pb2_grpc
from splitserve.proto.convert import layout_from_proto, layout_to_proto
from splitserve.proto.server import CHANNEL_OPTIONS, token_metadata
from splitserve.proto.status import grpc_code
from splitserve.proto.tls import TLSFiles, channel

logger = logging.getLogger(__name__)



# glibc mallopt parameters: freed buffers up to 32 MiB (4x the largest KV message) stay in the
# heap, and up to 512 MiB of free heap is kept rather than trimmed.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 32 << 20, 512 << 20


@functools.cache
def keep_freed_buffers() -> bool:
    """Let this process reuse the heap memory of freed KV messages instead of faulting in new
    pages for each (glibc only; elsewhere a no-op). Returns whether the setting took."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    logger.debug("glibc malloc: mmap threshold %d MiB, trim threshold %d MiB: %s", _MMAP_THRESHOLD >> 20, _TRIM_THRESHOLD >> 20, "set" if ok else "refused")
    return ok


RAW_SERVICE = "splitserve.kv.KVBytes"
RAW_PUSH = f"/{RAW_SERVICE}/Push"
TOUCH_TIMEOUT = 30.0  # a touch is one small message: a receiver that cannot take it in this long is lost (its transfers fail over)


class _PushSession:
    """One Push stream on the receiver: payloads, commits, aborts and touches, for any requests. A
    stream that breaks fails the transfers it left open."""

    def __init__(self, receiver: KVReceiver, context: grpc.ServicerContext) -> None:
        self.receiver, self.context = receiver, context
        self.open: set[str] = set()
        self.payloads = self.nbytes = 0

    def run(self, messages: Iterator[tuple[kv_pb2.KVMessage, Callable[[], bytes] | None]]) -> kv_pb2.PushResult:
        """`messages`: each control message, and for a payload how to get its bytes."""
        try:
            for msg, data in messages:
                self._handle(msg, data)
        except TransferError as e:
            self.context.abort(grpc_code(e), str(e))
        except Exception as e:
            # the stream broke (sender gone, or cancelled): its unfinished transfers fail now,
            # not at lease expiry
            for rid in self.open:
                self.receiver.table.fail(rid, f"KV stream broke: {type(e).__name__}", "UNAVAILABLE")
            raise
        if self.open and not self.context.is_active():
            for rid in self.open:
                self.receiver.table.fail(rid, "KV stream cancelled by the sender", "UNAVAILABLE")
        return kv_pb2.PushResult(payloads=self.payloads, bytes=self.nbytes)

    def _handle(self, msg: kv_pb2.KVMessage, data: Callable[[], bytes] | None) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "payload":
            p = msg.payload
            header = PayloadHeader(p.request_id, p.layer, tuple(p.block_ids), p.dtype, tuple(p.shape), p.byte_length, p.secret)
            try:
                payload = data() if data is not None else p.data  # read before any check: the stream stays in step
            except PayloadError as e:
                self.receiver.table.authorize(p.request_id, p.secret)  # a stranger's broken stream fails nothing
                self.receiver.table.fail(p.request_id, str(e), "INTERNAL")
                raise
            self.receiver.receive(header, lambda dest: copy_bytes_into(dest, payload, header))
            self.open.add(p.request_id)  # only once the secret was right
            self.payloads += 1
            self.nbytes += p.byte_length
        elif kind == "commit":
            c = msg.commit
            first = FirstToken(c.first_token, c.first_logprob, tuple(zip(c.top_token_ids, c.top_logprobs)))
            self.receiver.commit(c.request_id, c.secret, first, c.num_tokens)
            self.open.discard(c.request_id)
        elif kind == "abort":
            self.receiver.abort(msg.abort.request_id, msg.abort.secret, msg.abort.reason)
            self.open.discard(msg.abort.request_id)
        elif kind == "touch":
            self.receiver.touch(msg.touch.request_id, msg.touch.secret)


class KVTransferServicer(kv_pb2_grpc.KVTransferServicer):
    """Receiver side. `torch_acceptor(sender_id) -> (store_address, pair_key)` serves the
    torch.distributed transport's handshake when that transport is enabled."""

    def __init__(self, receiver: KVReceiver, torch_acceptor=None) -> None:
        self.receiver = receiver
        self.torch_acceptor = torch_acceptor

    def Handshake(self, request: kv_pb2.HandshakeRequest, context: grpc.ServicerContext) -> kv_pb2.HandshakeResponse:
        try:
            self.receiver.handshake(layout_from_proto(request.layout))
        except HandshakeError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        reply = kv_pb2.HandshakeResponse(receiver_id=self.receiver.receiver_id)
        if request.transport == "torch":
            if self.torch_acceptor is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "transport 'torch' is not enabled on this decode worker")
            reply.store_address, reply.pair_key = self.torch_acceptor(request.sender_id)
        return reply

    def Push(self, request_iterator: Iterator[kv_pb2.KVMessage], context: grpc.ServicerContext) -> kv_pb2.PushResult:
        """The .proto's method: payload bytes inside the protobuf."""
        return _PushSession(self.receiver, context).run((msg, None) for msg in request_iterator)

    def PushBytes(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> kv_pb2.PushResult:
        """The raw method: control messages as serialized KVMessages, payload bytes as they are."""

        def payload_bytes() -> bytes:
            data = next(request_iterator, None)
            if data is None:
                raise PayloadError("KV stream ended between a payload's header and its bytes")
            return data

        def messages() -> Iterator[tuple[kv_pb2.KVMessage, Callable[[], bytes] | None]]:
            for raw in request_iterator:
                try:
                    msg = kv_pb2.KVMessage.FromString(raw)
                except DecodeError as e:
                    raise PayloadError(f"malformed KV control message: {e}") from None
                yield msg, payload_bytes if msg.WhichOneof("kind") == "payload" else None

        return _PushSession(self.receiver, context).run(messages())


def add_kv_transfer_service(servicer: KVTransferServicer, server: grpc.Server) -> None:
    """Register the KVTransfer service (.proto) and the raw-bytes Push next to it."""
    keep_freed_buffers()
    kv_pb2_grpc.add_KVTransferServicer_to_server(servicer, server)
    raw = grpc.stream_unary_rpc_method_handler(servicer.PushBytes, response_serializer=kv_pb2.PushResult.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RAW_SERVICE, {"Push": raw}),))


def _rpc_error(e: grpc.RpcError, what: str) -> TransferError:
    code = e.code() if hasattr(e, "code") else None
    detail = e.details() if hasattr(e, "details") else str(e)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
        return PeerUnavailableError(f"{what}: {code.name}: {detail}")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return PayloadError(f"{what}: {detail}")
    return TransferError(f"{what}: {detail}", code.name if code else None)


def handshake(channel: grpc.Channel, sender_id: str, layout: KVLayout, transport: str, timeout: float, token: str | None = None) -> kv_pb2.HandshakeResponse:
    stub = kv_pb2_grpc.KVTransferStub(channel)
    try:
        return stub.Handshake(
            kv_pb2.HandshakeRequest(sender_id=sender_id, layout=layout_to_proto(layout), transport=transport),
            timeout=timeout,
            metadata=token_metadata(token),
        )
    except grpc.RpcError as e:
        if e.code() is grpc.StatusCode.FAILED_PRECONDITION:
            raise HandshakeRefusedError(e.details()) from None
        raise _rpc_error(e, "KV handshake") from None


class _Stream:
    """One Push call: what is queued goes out in order. Payload tensors are turned into bytes
    by gRPC's thread of this call as it sends them, so the streams of a request copy in
    parallel."""

    def __init__(self, push, timeout: float, metadata: tuple, secret: str) -> None:
        self.secret = secret  # the reservation's, for an abort when the sender closes
        self.queue: queue.Queue[object] = queue.Queue()
        self.future = push.future(self._frames(), timeout=timeout, metadata=metadata)

    def _frames(self) -> Iterator[object]:
        while (item := self.queue.get()) is not None:
            yield to_bytes(item) if isinstance(item, torch.Tensor) else item


class GrpcSender(KVSender):
    """Sends a request's payloads over `streams` Push calls (raw method), spread round-robin
    (a payload's header and bytes go on one call); its commit goes out on the last call once
    the others have ended, i.e. once the receiver has every payload. Falls back to one
    protobuf Push call per request when the receiver lacks the raw method."""

    # One layer of a 4096-token 8B-model prefill in two messages; larger messages measured
    # slower in gRPC Python (its buffers for them are allocated and copied whole).
    max_payload_bytes = 8 << 20
    # Two calls measured ~1.5x one on 2 CPU cores: while one call's bytes are copied into or
    # out of Python objects, the other's are on the socket. More did not pay there.
    streams = 2

    def __init__(
        self, endpoint: str, sender_id: str, layout: KVLayout, timeout: float = 600.0, handshake_timeout: float = 10.0, token: str | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        keep_freed_buffers()
        self.channel = channel(endpoint, tls, CHANNEL_OPTIONS)
        self.timeout = timeout
        self.metadata = token_metadata(token)
        handshake(self.channel, sender_id, layout, "grpc", handshake_timeout, token)
        self.stub = kv_pb2_grpc.KVTransferStub(self.channel)
        self._raw_push = self.channel.stream_unary(RAW_PUSH, response_deserializer=kv_pb2.PushResult.FromString)
        self.raw = self._has_raw_push(handshake_timeout)
        self._streams: dict[str, list[_Stream]] = {}
        self._sent: dict[str, int] = {}  # payloads sent per request: picks the next call

    def _has_raw_push(self, timeout: float) -> bool:
        """Whether the receiver serves the raw method (an empty stream is a no-op there)."""
        try:
            self._raw_push(iter(()), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                logger.info("KV receiver lacks %s: payloads go inside protobuf messages", RAW_PUSH)
                return False
            raise _rpc_error(e, "KV raw-stream probe") from None
        return True

    def _calls(self, request_id: str, secret: str) -> list[_Stream]:
        calls = self._streams.get(request_id)
        if calls is None:
            push = self._raw_push if self.raw else self.stub.Push
            n = self.streams if self.raw else 1
            calls = self._streams[request_id] = [_Stream(push, self.timeout, self.metadata, secret) for _ in range(n)]
            self._sent[request_id] = 0
        elif any(c.future.done() for c in calls):  # the receiver already refused a call: say why now
            self._finish(request_id)
        return calls

    def send(self, header: PayloadHeader, kv: torch.Tensor) -> None:
        calls = self._calls(header.request_id, header.secret)
        n = self._sent[header.request_id]
        self._sent[header.request_id] = n + 1
        msg = kv_pb2.KVMessage()
        p = msg.payload  # filled in place: KVMessage(payload=...) would copy the bytes again
        p.request_id, p.layer, p.dtype, p.byte_length, p.secret = header.request_id, header.layer, header.dtype, header.byte_length, header.secret
        p.block_ids.extend(header.block_ids)
        p.shape.extend(header.shape)
        if self.raw:
            call = calls[n % len(calls)]
            call.queue.put(msg.SerializeToString())
            call.queue.put(kv.detach())
        else:
            p.data = to_bytes(kv)
            calls[0].queue.put(msg)

    def _control(self, call: _Stream, msg: kv_pb2.KVMessage) -> None:
        call.queue.put(msg.SerializeToString() if self.raw else msg)

    def finish(self, request_id: str) -> None:
        if request_id in self._streams:
            self._finish(request_id)

    def commit(self, request_id: str, secret: str, first: FirstToken, num_tokens: int) -> None:
        calls = self._calls(request_id, secret)
        self._end(request_id, calls[:-1])  # every payload is in before the commit is read
        commit = kv_pb2.KVCommit(request_id=request_id, secret=secret, first_token=first.token, first_logprob=first.logprob, num_tokens=num_tokens,
                                 top_token_ids=[i for i, _ in first.top_logprobs], top_logprobs=[lp for _, lp in first.top_logprobs])
        self._control(calls[-1], kv_pb2.KVMessage(commit=commit))
        self._finish(request_id)

    def abort(self, request_id: str, secret: str, reason: str) -> None:
        calls = self._streams.get(request_id) or self._calls(request_id, secret)
        self._control(calls[-1], kv_pb2.KVMessage(abort=kv_pb2.KVAbort(request_id=request_id, secret=secret, reason=reason)))
        try:
            self._finish(request_id)
        except TransferError as e:
            logger.debug("abort of %s: %s", request_id, e)

    def touch(self, request_id: str, secret: str) -> None:
        # a call of its own: the request's streams (and their deadline) start with its KV
        msg = kv_pb2.KVMessage(touch=kv_pb2.KVTouch(request_id=request_id, secret=secret))
        push = self._raw_push if self.raw else self.stub.Push
        try:
            push(iter([msg.SerializeToString() if self.raw else msg]), timeout=TOUCH_TIMEOUT, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _rpc_error(e, "KV touch") from None

    def _end(self, request_id: str, calls: list[_Stream]) -> None:
        """End these calls and wait for their results; a refused call ends the request."""
        for call in calls:
            call.queue.put(None)
        try:
            for call in calls:
                call.future.result()
        except grpc.RpcError as e:
            self._finish(request_id)  # ends the others too
            raise _rpc_error(e, f"KV transfer of {request_id}") from None

    def _finish(self, request_id: str) -> None:
        calls = self._streams.pop(request_id)
        self._sent.pop(request_id, None)
        error = None
        for call in calls:
            if not call.future.done():
                call.queue.put(None)
        for call in calls:
            try:
                call.future.result()
            except grpc.RpcError as e:
                error = error or e
        if error is not None:
            raise _rpc_error(error, f"KV transfer of {request_id}") from None

    def close(self) -> None:
        for rid, calls in list(self._streams.items()):
            self.abort(rid, calls[0].secret, "sender closed")
        self.channel.close()
