"""gRPC face of the decode worker: converts messages and maps errors, nothing else."""

from __future__ import annotations

import grpc

from splitserve.decode_worker.worker import DecodeWorker
from splitserve.proto import worker_pb2, worker_pb2_grpc
from splitserve.proto.convert import descriptor_to_proto, params_from_proto, stats_to_proto, top_to_proto
from splitserve.proto.status import grpc_code

DEFAULT_DECODE_TIMEOUT = 3600.0


class DecodeService(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, worker: DecodeWorker) -> None:
        self.worker = worker

    def Reserve(self, request: worker_pb2.ReserveRequest, context: grpc.ServicerContext) -> worker_pb2.TransferDescriptor:
        try:
            params = params_from_proto(request.params)
            d = self.worker.reserve(request.request_id, list(request.prompt_token_ids), params, request.transport, request.lease_seconds,
                                    list(request.output_prefix))
        except Exception as e:
            context.abort(grpc_code(e), str(e))
        return descriptor_to_proto(d)

    def Decode(self, request: worker_pb2.DecodeRequest, context: grpc.ServicerContext):
        yield from self._stream(request.request_id, context)

    def Generate(self, request: worker_pb2.GenerateRequest, context: grpc.ServicerContext):
        try:
            self.worker.generate(request.request_id, list(request.prompt_token_ids), params_from_proto(request.params), list(request.output_prefix))
        except Exception as e:
            context.abort(grpc_code(e), str(e))
        yield from self._stream(request.request_id, context)

    def _stream(self, rid: str, context: grpc.ServicerContext):
        # a caller that goes away mid-stream must not leave its request decoding
        context.add_callback(lambda: None if finished else self.worker.abort(rid, "decode stream cancelled"))
        finished = False
        timeout = context.time_remaining() or DEFAULT_DECODE_TIMEOUT
        try:
            for c in self.worker.stream(rid, timeout):
                finished = c.finished
                yield worker_pb2.TokenChunk(
                    request_id=rid, token_ids=c.token_ids, logprobs=c.logprobs, text=c.text,
                    finished=c.finished, finish_reason=c.finish_reason or "", num_prompt_tokens=c.num_prompt_tokens,
                    kv_transfer_seconds=c.kv_transfer_seconds, kv_bytes=c.kv_bytes, num_cached_tokens=c.num_cached_tokens,
                    top_logprobs=top_to_proto(c.top_logprobs, worker_pb2.TopLogprobs),
                )
        except Exception as e:
            finished = True  # the worker already cleaned up
            context.abort(grpc_code(e), str(e))

    def Abort(self, request: worker_pb2.AbortRequest, context: grpc.ServicerContext) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(found=self.worker.abort(request.request_id, request.reason or "aborted by caller"))

    def Stats(self, request: worker_pb2.StatsRequest, context: grpc.ServicerContext) -> worker_pb2.WorkerStats:
        return stats_to_proto(self.worker.worker_id, "decode", self.worker.stats(), self.worker.layout)
