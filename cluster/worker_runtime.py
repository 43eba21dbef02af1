"""One pool member: an engine, its prefill or decode worker, the gRPC server and the heartbeat.

Life cycle: starting -> ready (registered, serving) -> draining (asked to; refuses new work)
-> drained (idle; the controller stops it). The same class runs inside a Ray actor
(cluster/ray_backend.py) or as a plain process (`python -m splitserve.cluster.worker_runtime SPEC_JSON`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
from dataclasses import asdict, dataclass

import grpc

from splitserve.cluster.registry import Heartbeat, Registry, WorkerRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    role: str  # "prefill" | "decode"
    worker_id: str
    cluster: str
    redis_url: str
    model: str
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_memory: int = 1 << 30
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int | None = None
    transport: str = "grpc"
    lease_seconds: float = 30.0
    host: str = "127.0.0.1"  # "" = this node's address
    token: str | None = None
    heartbeat_seconds: float = 1.0
    heartbeat_ttl_seconds: float = 5.0
    cp_degree: int = 1  # prefill: >1 makes this worker rank 0 of a context-parallel group
    cp_followers: str = "processes"  # "processes": rank 0 starts ranks 1..N-1; "placed": the backend does

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class WorkerRuntime:
    def __init__(self, spec: WorkerSpec, restarts: int = 0) -> None:
        from splitserve.engine.config import EngineConfig
        from splitserve.engine.engine import LLMEngine
        from splitserve.engine.scheduler import SchedulerConfig
        from splitserve.proto.server import start_server

        if not spec.host:  # on a multi-node cluster: this node's address, which peers can reach
            spec = dataclasses.replace(spec, host=socket.gethostbyname(socket.gethostname()))
        self.spec = spec
        engine = None if spec.role == "prefill" and spec.cp_degree > 1 else LLMEngine(EngineConfig(
            model=spec.model, dtype=spec.dtype, device=spec.device, block_size=spec.block_size,
            kv_cache_memory_bytes=spec.kv_cache_memory, max_model_len=spec.max_model_len,
            scheduler=SchedulerConfig(max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens, max_prefill_chunk=spec.max_prefill_chunk),
        ))
        self.worker, add_services, names = self._build(engine)
        self.server, port, _ = start_server(spec.host, 0, add_services, names, spec.token)
        self.address = f"{spec.host}:{port}"
        if spec.role == "decode":
            self.worker.set_rpc_endpoint(self.address)
        record = WorkerRecord(spec.worker_id, spec.role, self.address, "ready", self.worker.layout.model_fingerprint,
                              self.worker.layout.to_dict(), pid=os.getpid(), restarts=restarts)
        self.heartbeat = Heartbeat(Registry(spec.redis_url, spec.cluster, spec.heartbeat_ttl_seconds), record, self._load, self._drain, spec.heartbeat_seconds)
        self.heartbeat.start()
        logger.info("%s worker %s serving on %s", spec.role, spec.worker_id, self.address)

    def _build(self, engine):
        from splitserve.kv_transfer.grpc_transport import KVTransferServicer
        from splitserve.proto import kv_pb2_grpc, worker_pb2_grpc

        s = self.spec
        if s.role == "prefill":
            from splitserve.prefill_worker.service import PrefillService
            from splitserve.prefill_worker.worker import PrefillWorker

            if s.cp_degree > 1:
                from splitserve.prefill_worker.cp import start_group

                publish = None
                if s.cp_followers == "placed":
                    registry = Registry(s.redis_url, s.cluster, s.heartbeat_ttl_seconds)
                    publish = lambda address: registry.publish_cp_store(s.worker_id, address)  # noqa: E731
                worker = start_group(s.model, world=s.cp_degree, block_size=s.block_size, worker_id=s.worker_id, dtype=s.dtype,
                                     device=s.device, token=s.token, host=s.host, publish_store=publish)
            else:
                worker = PrefillWorker(engine, s.worker_id, token=s.token)
            return worker, lambda srv: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillService(worker), srv), ["splitserve.worker.PrefillWorker"]
        if s.role == "decode":
            from splitserve.decode_worker.service import DecodeService
            from splitserve.decode_worker.worker import DecodeWorker

            transports = ("grpc", "torch") if s.transport in ("grpc", "torch") else (s.transport,)
            worker = DecodeWorker(engine, s.worker_id, host=s.host, transports=transports, default_transport=s.transport, lease_seconds=s.lease_seconds)

            def add(srv: grpc.Server) -> None:
                worker_pb2_grpc.add_DecodeWorkerServicer_to_server(DecodeService(worker), srv)
                kv_pb2_grpc.add_KVTransferServicer_to_server(KVTransferServicer(worker.receiver, worker.torch_server.accept if worker.torch_server else None), srv)

            return worker, add, ["splitserve.worker.DecodeWorker", "splitserve.kv.KVTransfer"]
        raise ValueError(f"role must be 'prefill' or 'decode', got {s.role!r}")

    def _load(self) -> dict:
        stats = self.worker.stats()
        record = self.heartbeat.record
        if getattr(self.worker, "broken", None) and record.state != "broken":
            record.state = "broken"  # a CP group that lost a rank: the controller replaces it
            logger.warning("worker %s is broken: %s", self.spec.worker_id, self.worker.broken)
        if record.state == "draining" and _idle(stats):
            record.state = "drained"
            logger.info("worker %s drained", self.spec.worker_id)
        return stats

    def _drain(self) -> None:
        logger.info("worker %s draining", self.spec.worker_id)
        self.worker.accepting = False
        self.heartbeat.record.state = "draining"

    def info(self) -> dict:
        return {"worker_id": self.spec.worker_id, "role": self.spec.role, "address": self.address, "pid": os.getpid()}

    def stop(self) -> None:
        self.heartbeat.stop()
        try:
            self.heartbeat.registry.forget(self.spec.worker_id)
        except Exception as e:  # the registry may be gone already; the record expires anyway
            logger.debug("could not unregister %s: %s", self.spec.worker_id, e)
        self.server.stop(2).wait(3)
        self.worker.close()


def _idle(stats: dict) -> bool:
    return stats["running"] == 0 and stats["waiting"] == 0 and stats["reserved_blocks"] == 0 and stats.get("active_transfers", 0) == 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runtime = WorkerRuntime(WorkerSpec(**json.loads(sys.argv[1])))
    from splitserve.proto.server import announce, wait_for_termination

    announce(**runtime.info())
    wait_for_termination(runtime.server, runtime.stop)


if __name__ == "__main__":
    main()
