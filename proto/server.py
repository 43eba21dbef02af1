"""Boilerplate shared by every gRPC server of splitserve: thread pool (or asyncio), message
limits, grpc.health.v1, binding a port (0 = any free one), and the cluster-token check."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

TOKEN_HEADER = "x-splitserve-token"
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
# A synchronous gRPC server runs each call on a thread of its pool, and a decode worker holds a
# call open per request twice (its token stream, and its KV stream on the gRPC transport): a
# small pool lets waiting token streams starve the KV streams they wait for. Threads are made
# on demand, so an idle server holds few.
MAX_THREADS = 2048


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without the cluster token (health checks excepted)."""

    def __init__(self, token: str) -> None:
        self._token = token

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong {TOKEN_HEADER}")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/grpc.health.v1."):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get(TOKEN_HEADER) != self._token:
            return self._deny
        return continuation(handler_call_details)


def start_server(
    host: str,
    port: int,
    add_services: Callable[[grpc.Server], None],
    service_names: list[str],
    token: str | None = None,
    max_workers: int = MAX_THREADS,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    interceptors = [TokenInterceptor(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers), options=OPTIONS, interceptors=interceptors)
    add_services(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    server.start()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


async def start_aio_server(
    host: str, port: int, add_services: Callable[[grpc.aio.Server], None], service_names: list[str]
) -> tuple[grpc.aio.Server, int]:
    """The asyncio twin of `start_server` (no thread per call), on the running event loop."""
    from grpc_health.v1._async import HealthServicer

    server = grpc.aio.server(options=OPTIONS)
    add_services(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_HEADER, token),) if token else ()


def wait_for_termination(server: grpc.Server, on_stop: Callable[[], None], grace: float = 2.0) -> None:
    """Block until SIGTERM/SIGINT, then stop accepting calls, let running ones end, clean up."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace).wait(grace + 1)
    on_stop()


def announce(**fields: object) -> None:
    """Print the one JSON line that tells a parent process this worker is ready, and where."""
    import json
    import sys

    print(json.dumps({"event": "ready", **fields}), flush=True)
    sys.stdout.flush()
