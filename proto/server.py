"""Boilerplate shared by every gRPC server of splitserve: thread pool (or asyncio), message
limits, grpc.health.v1, binding a port (0 = any free one; TLS when configured), the cluster-token check, and (for
public asyncio servers) services that answer undecodable requests INVALID_ARGUMENT."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
import grpc.aio
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.proto.keepalive import ACCEPT_PINGS, KEEPALIVE
from splitserve.proto.tls import TLSFiles, add_port

TOKEN_HEADER = "x-splitserve-token"
# HTTP/2 frames up to 16 MiB instead of 16 KiB: a KV message of 8 MiB crosses as one frame, not 512
_SIZES = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20), ("grpc.http2.max_frame_size", (1 << 24) - 1)]
CHANNEL_OPTIONS = [*_SIZES, *KEEPALIVE]
# no SO_REUSEPORT (gRPC's default on Linux): a second server on a port in use must fail to bind,
# not share the port and take a random half of the first one's calls
SERVER_OPTIONS = [*_SIZES, *ACCEPT_PINGS, ("grpc.so_reuseport", 0)]
# Workers' servers take KV payloads of MiBs: reads of up to 16 MiB let a payload arrive in one
# piece, which gRPC Python hands over without joining pieces (one copy of every byte fewer;
# 1.5 -> 2.2 GB/s on loopback on one host). On another host reads stopped at 4 MiB whatever
# these said and paired runs with and without them measured the same (0.93-1.01 GB/s both).
# The chunk size adapts down on connections that carry less.
WORKER_OPTIONS = [*SERVER_OPTIONS, ("grpc.experimental.tcp_read_chunk_size", 8 << 20), ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20)]
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
    tls: TLSFiles | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    interceptors = [TokenInterceptor(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers), options=WORKER_OPTIONS, interceptors=interceptors)
    add_services(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = add_port(server, f"{host}:{port}", tls)
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    server.start()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


async def start_aio_server(
    host: str, port: int, add_services: Callable[[grpc.aio.Server], None], service_names: list[str], *,
    max_message_bytes: int | None = None, max_concurrent_rpcs: int | None = None, tls: TLSFiles | None = None,
) -> tuple[grpc.aio.Server, int]:
    """The asyncio twin of `start_server` (no thread per call), on the running event loop.
    `max_message_bytes` lowers the largest request accepted; beyond `max_concurrent_rpcs`
    calls gRPC itself answers RESOURCE_EXHAUSTED."""
    from grpc_health.v1._async import HealthServicer

    options = SERVER_OPTIONS
    if max_message_bytes is not None:
        options = [o for o in options if o[0] != "grpc.max_receive_message_length"] + [("grpc.max_receive_message_length", max_message_bytes)]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)
    add_services(server)
    health_servicer = HealthServicer()
    add_checked_service(server, health_servicer, health_pb2.DESCRIPTOR.services_by_name["Health"])
    bound = add_port(server, f"{host}:{port}", tls)
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


@dataclass(frozen=True)
class Undecodable:
    """What a checked method's servicer would have got instead of a request that does not parse."""

    type_name: str
    error: str

    @property
    def message(self) -> str:
        return f"the request is not a valid {self.type_name} message: {self.error}"


def add_checked_service(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Register `servicer` for every method of `service`, as the generated
    add_*Servicer_to_server does, except that a request whose bytes do not parse as the method's
    message is answered INVALID_ARGUMENT naming the message type (grpcio answers UNKNOWN or
    INTERNAL). Covers every method of the descriptor, whatever its streaming kinds."""
    handlers = {m.name: _checked_handler(getattr(servicer, m.name), m) for m in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _checked_handler(behavior: Callable, method: MethodDescriptor) -> grpc.RpcMethodHandler:
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)

    def deserialize(data: bytes):
        try:
            return request_cls.FromString(data)
        except DecodeError as e:
            return Undecodable(method.input_type.full_name, str(e) or "cannot parse")

    async def refuse(context: grpc.aio.ServicerContext, bad: Undecodable) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)

    if method.client_streaming:  # the requests arrive as an iterator: check each as it is read
        async def behavior_in(requests, context):
            async def checked():
                async for r in requests:
                    if isinstance(r, Undecodable):
                        await refuse(context, r)
                    yield r

            return behavior(checked(), context)

        wrapped = _same_kind(behavior, behavior_in)
    else:
        async def behavior_in(request, context):
            if isinstance(request, Undecodable):
                await refuse(context, request)
            return behavior(request, context)

        wrapped = _same_kind(behavior, behavior_in)
    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return kind[method.client_streaming, method.server_streaming](wrapped, request_deserializer=deserialize,
                                                                  response_serializer=response_cls.SerializeToString)


def _same_kind(behavior: Callable, check: Callable) -> Callable:
    """`check(request, context)` returns what `behavior` returns (a coroutine or an async
    generator) once the request passed: wrap it as a function of the same kind, which is what
    grpc.aio looks at to drive it."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            async for response in await check(request, context):
                yield response

        return stream

    async def call(request, context):
        result = await check(request, context)
        return await result if inspect.isawaitable(result) else result

    return call


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
