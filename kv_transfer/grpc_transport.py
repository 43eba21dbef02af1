"""gRPC transport: KV payloads as a client stream, one stream per request.

Works across any network (the fallback when torch.distributed cannot connect). The receiver
copies each payload's bytes straight into the reserved blocks (or one staging tensor when the
blocks are not contiguous). The stream's result confirms the commit, so the sender knows the
KV landed; a stream that breaks fails its request on both sides.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator

import grpc

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
from splitserve.proto.server import OPTIONS as CHANNEL_OPTIONS
from splitserve.proto.server import token_metadata
from splitserve.proto.status import grpc_code
from splitserve.proto.tls import TLSFiles, channel

logger = logging.getLogger(__name__)



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
        open_requests: set[str] = set()
        payloads = nbytes = 0
        try:
            for msg in request_iterator:
                kind = msg.WhichOneof("kind")
                if kind == "payload":
                    p = msg.payload
                    header = PayloadHeader(p.request_id, p.layer, tuple(p.block_ids), p.dtype, tuple(p.shape), p.byte_length, p.secret)
                    self.receiver.receive(header, lambda dest: copy_bytes_into(dest, p.data, header))
                    open_requests.add(p.request_id)  # only once the secret was right
                    payloads += 1
                    nbytes += p.byte_length
                elif kind == "commit":
                    c = msg.commit
                    first = FirstToken(c.first_token, c.first_logprob, tuple(zip(c.top_token_ids, c.top_logprobs)))
                    self.receiver.commit(c.request_id, c.secret, first, c.num_tokens)
                    open_requests.discard(c.request_id)
                elif kind == "abort":
                    self.receiver.abort(msg.abort.request_id, msg.abort.secret, msg.abort.reason)
                    open_requests.discard(msg.abort.request_id)
        except TransferError as e:
            context.abort(grpc_code(e), str(e))
        except Exception as e:
            # the stream broke (sender gone, or cancelled): its unfinished transfers fail now,
            # not at lease expiry
            for rid in open_requests:
                self.receiver.table.fail(rid, f"KV stream broke: {type(e).__name__}", "UNAVAILABLE")
            raise
        if open_requests and not context.is_active():
            for rid in open_requests:
                self.receiver.table.fail(rid, "KV stream cancelled by the sender", "UNAVAILABLE")
        return kv_pb2.PushResult(payloads=payloads, bytes=nbytes)


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
    def __init__(self, stub: kv_pb2_grpc.KVTransferStub, timeout: float, metadata: tuple, secret: str) -> None:
        self.secret = secret  # the reservation's, for an abort when the sender closes
        self.queue: queue.Queue[kv_pb2.KVMessage | None] = queue.Queue()
        self.future = stub.Push.future(iter(self.queue.get, None), timeout=timeout, metadata=metadata)


class GrpcSender(KVSender):
    def __init__(
        self, endpoint: str, sender_id: str, layout: KVLayout, timeout: float = 600.0, handshake_timeout: float = 10.0, token: str | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self.channel = channel(endpoint, tls, CHANNEL_OPTIONS)
        self.timeout = timeout
        self.metadata = token_metadata(token)
        handshake(self.channel, sender_id, layout, "grpc", handshake_timeout, token)
        self.stub = kv_pb2_grpc.KVTransferStub(self.channel)
        self._streams: dict[str, _Stream] = {}

    def send(self, header: PayloadHeader, kv) -> None:
        stream = self._streams.get(header.request_id)
        if stream is None:
            stream = self._streams[header.request_id] = self._open(header.secret)
        elif stream.future.done():  # the receiver already refused this stream: say why now
            self._finish(header.request_id)
        msg = kv_pb2.KVMessage()
        p = msg.payload  # filled in place: KVMessage(payload=...) would copy the bytes again
        p.request_id, p.layer, p.dtype, p.byte_length, p.secret = header.request_id, header.layer, header.dtype, header.byte_length, header.secret
        p.block_ids.extend(header.block_ids)
        p.shape.extend(header.shape)
        p.data = to_bytes(kv)
        stream.queue.put(msg)

    def finish(self, request_id: str) -> None:
        if request_id in self._streams:
            self._finish(request_id)

    def _open(self, secret: str) -> _Stream:
        return _Stream(self.stub, self.timeout, self.metadata, secret)

    def _stream(self, request_id: str, secret: str) -> _Stream:
        return self._streams.get(request_id) or self._streams.setdefault(request_id, self._open(secret))

    def commit(self, request_id: str, secret: str, first: FirstToken, num_tokens: int) -> None:
        stream = self._stream(request_id, secret)
        commit = kv_pb2.KVCommit(request_id=request_id, secret=secret, first_token=first.token, first_logprob=first.logprob, num_tokens=num_tokens,
                                 top_token_ids=[i for i, _ in first.top_logprobs], top_logprobs=[lp for _, lp in first.top_logprobs])
        stream.queue.put(kv_pb2.KVMessage(commit=commit))
        self._finish(request_id)

    def abort(self, request_id: str, secret: str, reason: str) -> None:
        stream = self._stream(request_id, secret)
        stream.queue.put(kv_pb2.KVMessage(abort=kv_pb2.KVAbort(request_id=request_id, secret=secret, reason=reason)))
        try:
            self._finish(request_id)
        except TransferError as e:
            logger.debug("abort of %s: %s", request_id, e)

    def _finish(self, request_id: str) -> None:
        stream = self._streams.pop(request_id)
        stream.queue.put(None)
        try:
            stream.future.result()
        except grpc.RpcError as e:
            raise _rpc_error(e, f"KV transfer of {request_id}") from None

    def close(self) -> None:
        for rid, stream in list(self._streams.items()):
            self.abort(rid, stream.secret, "sender closed")
        self.channel.close()
