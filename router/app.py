"""A router process's parts wired together: registry view, policy, orchestrator, metrics, the
public gRPC server (Generation, Admin, health, reflection) and the OpenAI HTTP server.

Life cycle: `Router(...)` builds the parts, then starts one event loop on its own thread (uvloop
when installed) that serves both APIs: the HTTP API on uvicorn, the gRPC API on grpc.aio, and
every call to workers on grpc.aio channels. No thread per request or per connection. The
constructor returns once both ports are bound; `stop()` lets running calls end briefly, then
closes everything.

What one client can hold is bounded at each door (router.* limits in cluster.yaml): requests in
flight by the orchestrator (both APIs), with uvicorn's limit_concurrency and gRPC's
maximum_concurrent_rpcs as backstops above it; HTTP sizes and timeouts by router/http_limits.py;
the gRPC request size by the server's receive limit; undecodable gRPC requests by the services
registered through proto.server.add_checked_service.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from pathlib import Path

import uvicorn
from grpc_reflection.v1alpha import reflection, reflection_pb2

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.kv_events import KVEventReader
from splitserve.cluster.registry import Registry
from splitserve.engine.checkpoint import checkpoint_fingerprint, safetensors_files
from splitserve.engine.config import ModelConfig
from splitserve.engine.tokenizer import Tokenizer
from splitserve.proto import public_pb2
from splitserve.proto.server import add_checked_service, start_aio_server
from splitserve.router.cluster_view import ClusterView
from splitserve.router.grpc_api import AdminService, GenerationService
from splitserve.router.http_api import OpenAIFrontend, build_app
from splitserve.router.http_limits import HTTPLimits, front_door, http_protocol
from splitserve.router.metrics import RouterMetrics
from splitserve.router.orchestrator import Orchestrator
from splitserve.router.policy import make_policy
from splitserve.router.predictors import TransferModel
from splitserve.router.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)
# Connections that arrive together wait in the kernel's queue instead of being reset; the
# kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096
START_TIMEOUT = 60.0


def served_model_name(config: ClusterConfig) -> str:
    return Path(config.model.path).resolve().name


def kv_block_bytes(model: ModelConfig, config: ClusterConfig) -> int:
    """Bytes of one KV block of every layer, as the workers store and move it."""
    name = model.torch_dtype if config.model.dtype == "auto" else config.model.dtype
    itemsize = 4 if name == "float32" else 2
    return model.num_layers * 2 * config.block_size * model.num_kv_heads * model.head_dim * itemsize


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Router:
    def __init__(self, config: ClusterConfig, redis_url: str, *, http_port: int | None = None, grpc_port: int | None = None) -> None:
        self.config = config
        model_dir = Path(config.model.path)
        model_config = ModelConfig.from_dir(model_dir)
        fingerprint = checkpoint_fingerprint(model_config, safetensors_files(model_dir))
        tokenizer = Tokenizer(model_dir)
        self.registry = Registry(redis_url, config.name, config.heartbeat_ttl_seconds)
        self.router_id = f"router-{uuid.uuid4().hex[:8]}"

        def share(mine: dict) -> dict:
            self.registry.publish_inflight(self.router_id, mine)
            return self.registry.others_inflight(self.router_id)

        self.view = ClusterView(self.registry.workers, token=config.cluster_token, tls=config.tls, model_fingerprint=fingerprint, share=share)
        self.metrics = RouterMetrics(self.view.records)
        r = config.routing
        self.index = PrefixIndex(r.index_capacity_blocks)
        self.kv_events = KVEventReader(self.registry.redis, self.registry.prefix, self.index, lambda: {w.worker_id for w in self.view.records()})
        options = dict(index=self.index, local_prefill_tokens=r.local_prefill_tokens, balance_factor=r.balance_factor,
                       balance_window=r.balance_window, kv_block_bytes=kv_block_bytes(model_config, config),
                       transfer_model=TransferModel(r.transfer_bytes_per_s))
        self.orchestrator = Orchestrator(
            self.view, make_policy(config.router.policy, **options), self.metrics, tokenizer, model_config, served_model_name(config),
            max_model_len=config.model.max_model_len, transport=config.kv_transfer.transport,
            timeout=config.router.request_timeout_s, max_retries=config.router.max_retries, block_size=config.block_size,
            colocated=config.colocated, admission=config.slo.admission, slo_ttft_ms=config.slo.ttft_ms, slo_slack=config.slo.slack,
            max_concurrent=config.router.max_concurrent_requests,
        )
        # admin keys may call everything; API keys (when there are any) only the inference APIs,
        # and the Admin API too unless the cluster has admin keys of its own
        admin = frozenset(config.admin_keys)
        self.api_keys = frozenset(config.api_keys) | admin if config.api_keys else frozenset()
        self.admin_keys = admin or self.api_keys
        if config.api_keys and not config.admin_keys:
            logger.warning("admin_keys is empty: every API key can also scale, drain and shut down the cluster")
        special = {k: v for k, v in tokenizer.config.items() if k in ("bos_token", "eos_token") and isinstance(v, str)}
        self.app = build_app(OpenAIFrontend(self.orchestrator, tokenizer.config.get("chat_template"), special), self.api_keys)
        self._sock = socket.create_server((config.router.host, config.router.http_port if http_port is None else http_port),
                                          backlog=LISTEN_BACKLOG, reuse_port=False)
        self.http_port = self._sock.getsockname()[1]
        self._grpc_port = config.router.grpc_port if grpc_port is None else grpc_port
        self._loop = new_event_loop()
        self._started = threading.Event()
        self._failed: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self.view.start()
        self.kv_events.start()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), name="router-loop", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT) or self._failed is not None:
            self.stop()
            error = OSError if isinstance(self._failed, OSError) else RuntimeError  # a port in use is the user's to fix
            raise error(f"router did not start: {self._failed}") from self._failed

    async def _serve(self) -> None:
        try:
            self._stopping = asyncio.Event()
            services = public_pb2.DESCRIPTOR.services_by_name
            names = [services[s].full_name for s in ("Generation", "Admin")]
            rc = self.config.router
            backstop = 2 * rc.max_concurrent_requests  # the orchestrator refuses first; these bound what never reaches it

            def add(server) -> None:
                add_checked_service(server, GenerationService(self.orchestrator, self.api_keys, rc.send_timeout_s), services["Generation"])
                add_checked_service(server, AdminService(self.registry, self.config.name, self.orchestrator.model_name, self.admin_keys, self.api_keys,
                                                                  self.config.max_replicas), services["Admin"])
                add_checked_service(server, reflection.aio.ReflectionServicer([*names, reflection.SERVICE_NAME, "grpc.health.v1.Health"]),
                                    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])

            self.grpc, self.grpc_port = await start_aio_server(rc.host, self._grpc_port, add, names, max_message_bytes=rc.max_request_bytes,
                                                               max_concurrent_rpcs=backstop, tls=self.config.tls)
            limits = HTTPLimits(rc.max_request_bytes, rc.max_header_bytes, rc.header_timeout_s, rc.body_timeout_s, rc.send_timeout_s)
            config = uvicorn.Config(front_door(self.app, limits, rc.cors_origins), http=http_protocol(limits), ws="none", limit_concurrency=backstop,
                                    log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=rc.drain_timeout_s,
                                    **({"ssl_certfile": self.config.tls.cert, "ssl_keyfile": self.config.tls.key} if self.config.tls else {}))
            self.http = uvicorn.Server(config)
            http_task = asyncio.ensure_future(self.http.serve(sockets=[self._sock]))
        except BaseException as e:
            self._failed = e
            self._started.set()
            return
        self._started.set()
        await self._stopping.wait()
        # drain: both listeners close (new connections are refused, new calls UNAVAILABLE), the
        # requests in flight finish, for at most drain_timeout_s; then the rest are aborted
        self.http.should_exit = True
        await asyncio.gather(http_task, self.grpc.stop(rc.drain_timeout_s), return_exceptions=True)
        await self.view.close_channels()

    @property
    def http_address(self) -> str:
        return f"{'https' if self.config.tls else 'http'}://{self.config.router.host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.config.router.host}:{self.grpc_port}"

    def stop(self) -> None:
        if self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(self.config.router.drain_timeout_s + 15)
        self.kv_events.stop()
        self.view.stop()
        self._sock.close()
