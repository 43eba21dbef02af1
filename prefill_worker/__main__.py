"""Run a prefill worker process: `python -m splitserve.prefill_worker --model DIR [--port 0] ...`.

Prints one JSON line {"event": "ready", "address": ...} when it serves, and shuts down cleanly
on SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import uuid

from splitserve.engine.args import add_engine_args, engine_config_from_args
from splitserve.engine.engine import LLMEngine
from splitserve.prefill_worker.service import PrefillService
from splitserve.prefill_worker.worker import PrefillWorker
from splitserve.proto import worker_pb2_grpc
from splitserve.proto.server import announce, start_server, wait_for_termination


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitserve.prefill_worker", description=__doc__.splitlines()[0])
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (reported on the ready line)")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--token", default=None, help="cluster token required on every call (and sent to decode workers)")
    parser.add_argument("--cp-degree", type=int, default=1, help="context-parallel ranks (>1: this process is rank 0 and starts the others)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    worker_id = args.worker_id or f"prefill-{uuid.uuid4().hex[:8]}"
    if args.cp_degree > 1:
        from splitserve.prefill_worker.cp import start_group

        worker = start_group(args.model, world=args.cp_degree, block_size=args.block_size, worker_id=worker_id, dtype=args.dtype, device=args.device, token=args.token, host=args.host)
    else:
        worker = PrefillWorker(LLMEngine(engine_config_from_args(args)), worker_id, token=args.token)
    server, port, _ = start_server(
        args.host, args.port, lambda s: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillService(worker), s),
        ["splitserve.worker.PrefillWorker"], args.token,
    )
    announce(role="prefill", worker_id=worker_id, address=f"{args.host}:{port}", layout=worker.layout.to_dict())
    wait_for_termination(server, worker.close)


if __name__ == "__main__":
    main()
