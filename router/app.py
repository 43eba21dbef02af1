"""A router process's parts wired together: registry view, policy, orchestrator, metrics, the
public gRPC server (Generation, Admin, health, reflection) and the OpenAI HTTP server."""

from __future__ import annotations

import logging
from pathlib import Path

from grpc_reflection.v1alpha import reflection

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.registry import Registry
from splitserve.engine.checkpoint import checkpoint_fingerprint, safetensors_files
from splitserve.engine.config import ModelConfig
from splitserve.engine.tokenizer import Tokenizer
from splitserve.proto import public_pb2, public_pb2_grpc
from splitserve.proto.server import start_server
from splitserve.router.cluster_view import ClusterView
from splitserve.router.grpc_api import AdminService, GenerationService
from splitserve.router.http_api import HTTPFrontendServer, OpenAIFrontend
from splitserve.router.metrics import RouterMetrics
from splitserve.router.orchestrator import Orchestrator
from splitserve.router.policy import make_policy

logger = logging.getLogger(__name__)


def served_model_name(config: ClusterConfig) -> str:
    return Path(config.model.path).resolve().name


class Router:
    def __init__(self, config: ClusterConfig, redis_url: str, *, http_port: int | None = None, grpc_port: int | None = None) -> None:
        self.config = config
        model_dir = Path(config.model.path)
        model_config = ModelConfig.from_dir(model_dir)
        fingerprint = checkpoint_fingerprint(model_config, safetensors_files(model_dir))
        tokenizer = Tokenizer(model_dir)
        self.registry = Registry(redis_url, config.name, config.heartbeat_ttl_seconds)
        self.view = ClusterView(self.registry.workers, token=config.cluster_token, model_fingerprint=fingerprint)
        self.metrics = RouterMetrics(self.view.records)
        self.orchestrator = Orchestrator(
            self.view, make_policy(config.router.policy), self.metrics, tokenizer, model_config, served_model_name(config),
            max_model_len=config.model.max_model_len, transport=config.kv_transfer.transport,
            timeout=config.router.request_timeout_s, max_retries=config.router.max_retries,
        )
        keys = frozenset(config.api_keys)
        special = {k: v for k, v in tokenizer.config.items() if k in ("bos_token", "eos_token") and isinstance(v, str)}
        self.http = HTTPFrontendServer(config.router.host, config.router.http_port if http_port is None else http_port,
                                       OpenAIFrontend(self.orchestrator, tokenizer.config.get("chat_template"), special), keys)

        names = [public_pb2.DESCRIPTOR.services_by_name[s].full_name for s in ("Generation", "Admin")]

        def add(server) -> None:
            public_pb2_grpc.add_GenerationServicer_to_server(GenerationService(self.orchestrator, keys), server)
            public_pb2_grpc.add_AdminServicer_to_server(AdminService(self.registry, config.name, served_model_name(config), keys), server)
            reflection.enable_server_reflection([*names, reflection.SERVICE_NAME, "grpc.health.v1.Health"], server)

        self.grpc, self.grpc_port, _ = start_server(
            config.router.host, config.router.grpc_port if grpc_port is None else grpc_port, add, names
        )
        self.view.start()
        self.http.start()

    @property
    def http_address(self) -> str:
        return f"http://{self.config.router.host}:{self.http.port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.config.router.host}:{self.grpc_port}"

    def stop(self) -> None:
        self.http.stop()
        self.grpc.stop(2).wait(3)
        self.view.stop()
