"""One pool member: an engine, its prefill or decode worker, the gRPC server and the heartbeat.

Life cycle: starting -> ready (serving; registered in Redis when the spec names one) ->
draining (asked to; refuses new work) -> drained (idle; the controller stops it). The same class
runs inside a Ray actor (cluster/ray_backend.py) or as a plain process:

    python -m splitserve.prefill_worker --model DIR [--redis-url URL --cluster NAME] ...
    python -m splitserve.decode_worker  --model DIR [--redis-url URL --cluster NAME] ...

Given a Redis URL and a cluster name, a worker started by hand joins that cluster: it
registers, beats, and the cluster's routers send it work like any other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import uuid
from dataclasses import asdict, dataclass

import grpc

from splitserve.cluster.worker_record import WorkerRecord
from splitserve.proto.tls import TLSFiles
from splitserve.proto.tls import add_flags as add_tls_flags
from splitserve.proto.tls import from_flags as tls_from_flags

logger = logging.getLogger(__name__)
ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class WorkerSpec:
    role: str  # "prefill" | "decode"
    worker_id: str
    model: str
    cluster: str = "splitserve"
    redis_url: str = ""  # "" = not registered anywhere: driven directly by its address
    # engine
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_memory: int = 1 << 30
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    linear_kernel: str = "torch"
    attention_backend: str = "auto"
    num_threads: int | None = None  # None: PyTorch's choice (under Ray: the worker's num_cpus)
    cuda_graphs: bool = True
    # serving
    transport: str = "grpc"  # decode: the default KV transport; prefill: unused
    transports: str = ""  # decode: accepted transports, comma-separated; "" = grpc,torch (or `transport` alone)
    lease_seconds: float = 30.0
    host: str = "127.0.0.1"  # "" = this node's address
    port: int = 0  # 0 = any free port
    kv_port: int | None = None  # decode: None = KV transfer on `port`; else a server of its own (0 = any free port)
    token: str | None = None
    heartbeat_seconds: float = 1.0
    heartbeat_ttl_seconds: float = 5.0
    cp_degree: int = 1  # prefill: >1 makes this worker rank 0 of a context-parallel group
    cp_followers: str = "processes"  # "processes": rank 0 starts ranks 1..N-1; "placed": the backend does
    tls: TLSFiles | None = None  # the cluster's TLS: its gRPC ports serve it, its KV pushes use it

    def __post_init__(self) -> None:
        if isinstance(self.tls, dict):  # from to_json
            object.__setattr__(self, "tls", TLSFiles(**self.tls))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def accepted_transports(self) -> tuple[str, ...]:
        if self.transports:
            return tuple(t for t in self.transports.split(",") if t)
        return ("grpc", "torch") if self.transport in ("grpc", "torch") else (self.transport,)

    def engine_config(self):
        from splitserve.engine.config import EngineConfig
        from splitserve.engine.scheduler import SchedulerConfig

        return EngineConfig(
            model=self.model, dtype=self.dtype, device=self.device, block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
            kv_cache_memory_bytes=self.kv_cache_memory, max_model_len=self.max_model_len, seed=self.seed,
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_prefill_chunk=self.max_prefill_chunk, enable_prefix_caching=self.enable_prefix_caching),
            record_kv_events=bool(self.redis_url),  # published for the routers' prefix index
            linear_kernel=self.linear_kernel, attention_backend=self.attention_backend, num_threads=self.num_threads, cuda_graphs=self.cuda_graphs,
        )


class WorkerRuntime:
    def __init__(self, spec: WorkerSpec, restarts: int = 0) -> None:
        from splitserve.proto.server import start_server

        if not spec.host:  # started by hand on a multi-node cluster: this node's routable address
            spec = dataclasses.replace(spec, host=node_address())
        self.spec = spec
        self.worker, add_services, names = self._build()
        self.server, port, _ = start_server(spec.host, spec.port, add_services, names, spec.token, tls=spec.tls)
        self.address = f"{spec.host}:{port}"
        self.kv_server: grpc.Server | None = None
        self.kv_address = self.address if spec.role == "decode" else None
        if spec.role == "decode":
            if spec.kv_port is not None:  # a port of its own, so a network policy can let only workers reach KV
                self.kv_server, kv_port, _ = start_server(spec.host, spec.kv_port, self._add_kv, ["splitserve.kv.KVTransfer"], spec.token,
                                                          tls=spec.tls)
                self.kv_address = f"{spec.host}:{kv_port}"
            self.worker.set_rpc_endpoint(self.kv_address)
        self.record = WorkerRecord(spec.worker_id, spec.role, self.address, "ready", self.worker.layout.model_fingerprint,
                                   self.worker.layout.to_dict(), pid=os.getpid(), restarts=restarts)
        self.heartbeat = self.kv_events = None
        if spec.redis_url:  # Redis only here: a worker on its own runs without a Redis client
            from splitserve.cluster.kv_events import KVEventPublisher
            from splitserve.cluster.registry import Heartbeat, Registry

            registry = Registry(spec.redis_url, spec.cluster, spec.heartbeat_ttl_seconds)
            self.kv_events = KVEventPublisher(registry.redis, registry.prefix, spec.worker_id, self.worker.kv_events)
            self.kv_events.start()
            self.heartbeat = Heartbeat(registry, self.record, self._load, self._drain, spec.heartbeat_seconds)
            self.heartbeat.start()
        logger.info("%s worker %s serving on %s%s", spec.role, spec.worker_id, self.address,
                    f" (cluster {spec.cluster!r})" if spec.redis_url else " (not registered in any cluster)")

    def _build(self):
        from splitserve.proto import worker_pb2_grpc

        s = self.spec
        if s.role == "prefill":
            from splitserve.prefill_worker.service import PrefillService

            worker = self._prefill_worker()
            return worker, lambda srv: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillService(worker), srv), ["splitserve.worker.PrefillWorker"]
        if s.role == "decode":
            from splitserve.decode_worker.service import DecodeService
            from splitserve.decode_worker.worker import DecodeWorker
            from splitserve.engine.engine import LLMEngine

            worker = DecodeWorker(LLMEngine(s.engine_config()), s.worker_id, host=s.host, transports=s.accepted_transports(),
                                  default_transport=s.transport, lease_seconds=s.lease_seconds)

            def add(srv: grpc.Server) -> None:
                worker_pb2_grpc.add_DecodeWorkerServicer_to_server(DecodeService(worker), srv)
                if s.kv_port is None:
                    add_kv_service(worker, srv)

            return worker, add, ["splitserve.worker.DecodeWorker", *(["splitserve.kv.KVTransfer"] if s.kv_port is None else [])]
        raise ValueError(f"role must be one of {ROLES}, got {s.role!r}")

    def _add_kv(self, srv: grpc.Server) -> None:
        add_kv_service(self.worker, srv)

    def _prefill_worker(self):
        s = self.spec
        if s.cp_degree > 1:
            from splitserve.prefill_worker.cp import start_group

            publish = None
            if s.cp_followers == "placed":
                from splitserve.cluster.registry import Registry

                registry = Registry(s.redis_url, s.cluster, s.heartbeat_ttl_seconds)
                publish = lambda address: registry.publish_cp_store(s.worker_id, address)  # noqa: E731
            return start_group(s.model, world=s.cp_degree, block_size=s.block_size, worker_id=s.worker_id, dtype=s.dtype,
                               device=s.device, token=s.token, host=s.host, publish_store=publish, tls=s.tls, linear_kernel=s.linear_kernel,
                               num_threads=s.num_threads)
        from splitserve.engine.engine import LLMEngine
        from splitserve.prefill_worker.worker import PrefillWorker

        return PrefillWorker(LLMEngine(s.engine_config()), s.worker_id, token=s.token, tls=s.tls)

    def _load(self) -> dict:
        stats = self.worker.stats()
        record = self.record
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
        self.record.state = "draining"

    def info(self) -> dict:
        return {"role": self.spec.role, "worker_id": self.spec.worker_id, "address": self.address, "kv_address": self.kv_address, "pid": os.getpid(),
                "cluster": self.spec.cluster if self.spec.redis_url else None, "layout": self.worker.layout.to_dict()}

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.kv_events.stop()
            try:
                self.heartbeat.registry.forget(self.spec.worker_id)
                self.kv_events.forget()
            except Exception as e:  # the registry may be gone already; the record expires anyway
                logger.debug("could not unregister %s: %s", self.spec.worker_id, e)
        self.server.stop(2).wait(3)
        if self.kv_server is not None:
            self.kv_server.stop(2).wait(3)
        self.worker.close()


def add_kv_service(worker, srv: grpc.Server) -> None:
    """A decode worker's KV receiving side: the gRPC transport and the torch transport's handshake."""
    from splitserve.kv_transfer.grpc_transport import KVTransferServicer, add_kv_transfer_service

    add_kv_transfer_service(KVTransferServicer(worker.receiver, worker.torch_server.accept if worker.torch_server else None), srv)


def node_address() -> str:
    """The address of the interface this node's default route leaves by: the one peers on other
    nodes reach it at (a hostname can resolve to loopback). No packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _idle(stats: dict) -> bool:
    return stats["running"] == 0 and stats["waiting"] == 0 and stats["reserved_blocks"] == 0 and stats.get("active_transfers", 0) == 0


# ---- `python -m splitserve.prefill_worker | decode_worker` -------------------------------------
def build_parser(role: str) -> argparse.ArgumentParser:
    from splitserve.engine.args import add_engine_args
    from splitserve.kv_transfer.connect import TRANSPORTS

    parser = argparse.ArgumentParser(prog=f"python -m splitserve.{role}_worker", description=f"Run a {role} worker process. Prints one JSON "
                                     "line {\"event\": \"ready\", \"address\": ...} when it serves; stops cleanly on SIGTERM / Ctrl-C.")
    add_engine_args(parser)
    g = parser.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1", help="address to serve on ('' = this node's address)")
    g.add_argument("--port", type=int, default=0, help="0 = any free port (reported on the ready line)")
    g.add_argument("--worker-id", default=None, help=f"default: {role}-<random>")
    g.add_argument("--token", default=None, help="cluster token required on every call (and sent to peers)")
    g.add_argument("--redis-url", default="", help="join the cluster whose registry this is (register and heartbeat)")
    g.add_argument("--cluster", default="splitserve", help="the cluster's name (cluster.yaml `name`), with --redis-url")
    g.add_argument("--heartbeat-seconds", type=float, default=1.0)
    g.add_argument("--heartbeat-ttl-seconds", type=float, default=5.0)
    if role == "decode":
        g.add_argument("--transports", default="grpc,torch", help="comma-separated subset of grpc,torch to accept KV over")
        g.add_argument("--default-transport", default="grpc", choices=[t for t in TRANSPORTS if t != "local"])
        g.add_argument("--lease-seconds", type=float, default=30.0, help="a reservation with no KV progress this long is freed")
        g.add_argument("--kv-port", type=int, default=None, help="serve KV transfer on a port of its own (0 = any free; default: on --port)")
    else:
        g.add_argument("--cp-degree", type=int, default=1, help="context-parallel ranks (>1: this process is rank 0 and starts the others)")
    add_tls_flags(parser)
    return parser


def spec_from_args(role: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> WorkerSpec:
    kw = dict(
        role=role, worker_id=args.worker_id or f"{role}-{uuid.uuid4().hex[:8]}", model=args.model, cluster=args.cluster, redis_url=args.redis_url,
        dtype=args.dtype, device=args.device, block_size=args.block_size, kv_cache_memory=args.kv_cache_memory, num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_prefill_chunk=args.max_prefill_chunk, enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
        linear_kernel=args.linear_kernel, attention_backend=args.attention_backend, num_threads=args.num_threads, cuda_graphs=not args.no_cuda_graphs,
        host=args.host, port=args.port, token=args.token, tls=tls_from_flags(parser, args), heartbeat_seconds=args.heartbeat_seconds, heartbeat_ttl_seconds=args.heartbeat_ttl_seconds,
    )
    if role == "decode":
        transports = [t for t in args.transports.split(",") if t]
        bad = [t for t in transports if t not in ("grpc", "torch")]
        if bad or not transports:
            parser.error(f"--transports: {bad or transports} not available to a decode process (choose from grpc, torch)")
        if args.default_transport not in transports:
            parser.error(f"--default-transport: {args.default_transport!r} is not among --transports {transports}")
        kw.update(transport=args.default_transport, transports=",".join(transports), lease_seconds=args.lease_seconds, kv_port=args.kv_port)
    elif args.cp_degree < 1:
        parser.error(f"--cp-degree: must be >= 1, got {args.cp_degree}")
    else:
        kw.update(cp_degree=args.cp_degree)
    return WorkerSpec(**kw)


def main(role: str | None = None, argv: list[str] | None = None) -> None:
    """Run one worker in this process until SIGTERM / Ctrl-C. With `role` None the spec comes
    as JSON in argv[1] (how tools start a worker from a `WorkerSpec`)."""
    from splitserve.proto.server import announce, wait_for_termination

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if role is None:
        spec = WorkerSpec(**json.loads((argv or sys.argv[1:])[0]))
    else:
        parser = build_parser(role)
        spec = spec_from_args(role, parser.parse_args(argv), parser)
    runtime = WorkerRuntime(spec)
    announce(**runtime.info())
    wait_for_termination(runtime.server, runtime.stop)


if __name__ == "__main__":
    main()
