"""Run a decode worker process: `python -m splitserve.decode_worker --model DIR [--port 0] ...`.

Prints one JSON line {"event": "ready", "address": ...} when it serves, and shuts down cleanly
on SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import uuid

from splitserve.decode_worker.service import DecodeService
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.engine.args import add_engine_args, engine_config_from_args
from splitserve.engine.engine import LLMEngine
from splitserve.kv_transfer.connect import TRANSPORTS
from splitserve.kv_transfer.grpc_transport import KVTransferServicer
from splitserve.proto import kv_pb2_grpc, worker_pb2_grpc
from splitserve.proto.server import announce, start_server, wait_for_termination


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitserve.decode_worker", description=__doc__.splitlines()[0])
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (reported on the ready line)")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--transports", default="grpc,torch", help=f"comma-separated subset of {TRANSPORTS} to accept")
    parser.add_argument("--default-transport", default="grpc", choices=TRANSPORTS)
    parser.add_argument("--lease-seconds", type=float, default=30.0)
    parser.add_argument("--token", default=None, help="cluster token required on every call")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    worker_id = args.worker_id or f"decode-{uuid.uuid4().hex[:8]}"
    transports = tuple(t for t in args.transports.split(",") if t)
    bad = [t for t in transports if t not in TRANSPORTS or t == "local"]
    if bad:
        parser.error(f"--transports: {bad} not available to a decode process (choose from grpc, torch)")
    engine = LLMEngine(engine_config_from_args(args))
    worker = DecodeWorker(engine, worker_id, host=args.host, transports=transports, default_transport=args.default_transport, lease_seconds=args.lease_seconds)

    def add(server) -> None:
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(DecodeService(worker), server)
        kv_pb2_grpc.add_KVTransferServicer_to_server(
            KVTransferServicer(worker.receiver, worker.torch_server.accept if worker.torch_server else None), server
        )

    server, port, _ = start_server(args.host, args.port, add, ["splitserve.worker.DecodeWorker", "splitserve.kv.KVTransfer"], args.token)
    worker.set_rpc_endpoint(f"{args.host}:{port}")
    announce(role="decode", worker_id=worker_id, address=f"{args.host}:{port}", layout=worker.layout.to_dict())
    wait_for_termination(server, worker.close)


if __name__ == "__main__":
    main()
