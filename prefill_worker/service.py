"""gRPC face of the prefill worker: converts messages and maps errors, nothing else."""

from __future__ import annotations

import grpc

from splitserve.prefill_worker.worker import PrefillWorker
from splitserve.proto import worker_pb2, worker_pb2_grpc
from splitserve.proto.convert import descriptor_from_proto, params_from_proto, stats_to_proto, top_to_proto
from splitserve.proto.status import RECEIVER_LOST, grpc_code

DEFAULT_PREFILL_TIMEOUT = 600.0


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker

    def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.ServicerContext) -> worker_pb2.PrefillResponse:
        rid = request.request_id
        context.add_callback(lambda: None if done else self.worker.abort(rid, "prefill call cancelled"))
        done = False
        try:
            r = self.worker.prefill(
                rid, list(request.prompt_token_ids), params_from_proto(request.params),
                descriptor_from_proto(request.descriptor), context.time_remaining() or DEFAULT_PREFILL_TIMEOUT, list(request.output_prefix),
            )
        except Exception as e:
            done = True
            if getattr(e, "receiver_lost", False):
                context.set_trailing_metadata(((RECEIVER_LOST, "1"),))
            context.abort(grpc_code(e), str(e))
        done = True
        (top,) = top_to_proto([r.first.top_logprobs], worker_pb2.TopLogprobs)
        return worker_pb2.PrefillResponse(
            request_id=rid, first_token=r.first.token, first_logprob=r.first.logprob, num_cached_tokens=r.num_cached_tokens,
            queue_seconds=r.queue_seconds, prefill_seconds=r.prefill_seconds, first_top_logprobs=top,
        )

    def Abort(self, request: worker_pb2.AbortRequest, context: grpc.ServicerContext) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(found=self.worker.abort(request.request_id, request.reason or "aborted by caller"))

    def Stats(self, request: worker_pb2.StatsRequest, context: grpc.ServicerContext) -> worker_pb2.WorkerStats:
        return stats_to_proto(self.worker.worker_id, "prefill", self.worker.stats(), self.worker.layout)
