"""Blocking stubs of one worker process, for tests that drive workers directly."""

from __future__ import annotations

import grpc

from splitserve.proto import kv_pb2_grpc, worker_pb2, worker_pb2_grpc


class WorkerStub:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.prefill = worker_pb2_grpc.PrefillWorkerStub(self.channel)
        self.decode = worker_pb2_grpc.DecodeWorkerStub(self.channel)
        self.kv = kv_pb2_grpc.KVTransferStub(self.channel)

    def stats(self, role: str = "decode") -> worker_pb2.WorkerStats:
        return (self.decode if role == "decode" else self.prefill).Stats(worker_pb2.StatsRequest(), timeout=10)
