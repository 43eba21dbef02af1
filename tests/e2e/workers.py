"""Blocking stubs of one worker process, for tests that drive workers directly."""

from __future__ import annotations

import grpc

from splitserve.proto import kv_pb2_grpc, worker_pb2, worker_pb2_grpc
from splitserve.proto.server import token_metadata
from splitserve.proto.tls import TLSFiles, channel


class WorkerStub:
    def __init__(self, address: str, token: str | None = None, tls: TLSFiles | None = None) -> None:
        self.address = address
        self.channel = channel(address, tls)
        if token:
            self.channel = grpc.intercept_channel(self.channel, _Token(token))
        self.prefill = worker_pb2_grpc.PrefillWorkerStub(self.channel)
        self.decode = worker_pb2_grpc.DecodeWorkerStub(self.channel)
        self.kv = kv_pb2_grpc.KVTransferStub(self.channel)

    def stats(self, role: str = "decode") -> worker_pb2.WorkerStats:
        return (self.decode if role == "decode" else self.prefill).Stats(worker_pb2.StatsRequest(), timeout=10)


class _Token(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds the cluster token to every call."""

    def __init__(self, token: str) -> None:
        self.metadata = token_metadata(token)

    def _with(self, details):
        return details._replace(metadata=[*(details.metadata or ()), *self.metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with(details), request_iterator)
