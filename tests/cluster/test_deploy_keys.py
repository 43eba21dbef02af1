"""The cluster.yaml keys a multi-node deployment (the Helm chart) relies on: `${NAME}` references
to the environment, custom Ray resources that pin a pool to its nodes, fixed worker ports with KV
on a port of its own, config-declared pool sizes, and a controller without a router."""

from __future__ import annotations

import typing
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.cluster import ray_backend
from splitserve.cluster.cli import build_parser, serve_config
from splitserve.cluster.config import ConfigError, ModelSection, parse_cluster_config
from splitserve.cluster.controller import Controller, worker_spec
from splitserve.cluster.ray_backend import bundle, ray_options
from splitserve.cluster.redis_server import EmbeddedRedis
from splitserve.cluster.registry import Registry
from splitserve.cluster.worker_runtime import WorkerRuntime, WorkerSpec, spec_from_args
from splitserve.cluster.worker_runtime import build_parser as worker_build_parser
from tests.cluster.test_controller import FakeBackend

ENV = {"TOKEN": "t0k3n", "KEY_A": "ka", "PASS": "pw"}


def parse(raw: dict, env: dict | None = None):
    return parse_cluster_config({"model": {"path": "m"}, **raw}, env=ENV if env is None else env)


# ---- ${NAME} --------------------------------------------------------------------------------
def test_env_references_expand_in_every_string_value_and_dollar_dollar_is_literal() -> None:
    c = parse({"cluster_token": "${TOKEN}", "api_keys": ["${KEY_A}", "plain"], "redis_url": "redis://:${PASS}@redis:6379/0",
               "model": {"path": "/m/$${TOKEN}"}})
    assert c.cluster_token == "t0k3n" and c.api_keys == ["ka", "plain"]
    assert c.redis_url == "redis://:pw@redis:6379/0" and c.model.path == "/m/${TOKEN}"


def test_expanded_values_are_not_expanded_again() -> None:
    assert parse({"cluster_token": "${TOKEN}"}, {"TOKEN": "${PASS}", "PASS": "no"}).cluster_token == "${PASS}"


def test_an_unset_variable_names_the_key_and_the_variable() -> None:
    with pytest.raises(ConfigError) as e:
        parse({"api_keys": ["ok", "${MISSING_KEY}"]}, {})
    assert e.value.key == "api_keys[1]" and "${MISSING_KEY}" in str(e.value) and "not set" in str(e.value)


def test_the_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_TEST_TOKEN", "from-env")
    assert parse_cluster_config({"model": {"path": "m"}, "cluster_token": "${SPLITSERVE_TEST_TOKEN}"}).cluster_token == "from-env"


def test_an_api_key_that_expands_to_nothing_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        parse({"api_keys": ["${EMPTY}"]}, {"EMPTY": ""})
    assert e.value.key == "api_keys[0]" and "non-empty" in str(e.value)


# ---- custom resources and ports -------------------------------------------------------------
def test_custom_resources_parse_and_reach_ray_options_and_cp_bundles() -> None:
    c = parse({"prefill": {"cp_degree": 2, "resources": {"num_cpus": 2, "num_gpus": 1, "custom": {"splitserve_prefill": 1}}}})
    r = c.prefill.resources
    assert r.custom == {"splitserve_prefill": 1.0}
    assert ray_options(r) == {"num_cpus": 2.0, "num_gpus": 1.0, "resources": {"splitserve_prefill": 1.0}}
    assert bundle(r) == {"CPU": 2.0, "GPU": 1.0, "splitserve_prefill": 1.0}
    plain = parse({}).decode.resources
    assert ray_options(plain) == {"num_cpus": 1.0, "num_gpus": 0.0} and bundle(plain) == {"CPU": 1.0}


@pytest.mark.parametrize("raw, key, fragment", [
    ({"decode": {"resources": {"custom": {"GPU": 1}}}}, "decode.resources.custom.GPU", "num_cpus / num_gpus"),
    ({"decode": {"resources": {"custom": {"splitserve_decode": 0}}}}, "decode.resources.custom.splitserve_decode", "> 0"),
    ({"decode": {"resources": {"custom": {"x": "one"}}}}, "decode.resources.custom.x", "must be float"),
    ({"decode": {"resources": {"custom": ["x"]}}}, "decode.resources.custom", "must be a mapping"),
    ({"prefill": {"port": 70000}}, "prefill.port", "0..65535"),
    ({"decode": {"kv_port": -1}}, "decode.kv_port", "0..65535"),
    ({"decode": {"port": 50061, "kv_port": 50061}}, "decode.kv_port", "different from decode.port"),
])
def test_deploy_key_errors_name_the_key(raw: dict, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(raw)
    assert e.value.key == key and fragment in str(e.value)


def test_the_controller_passes_ports_and_pinning_to_each_worker(redis_url: str) -> None:
    c = parse({"name": "pin", "prefill": {"port": 50061, "resources": {"custom": {"splitserve_prefill": 1}}},
               "decode": {"port": 50061, "kv_port": 50062, "resources": {"num_cpus": 2, "custom": {"splitserve_decode": 1}}}})
    p, d = worker_spec(c, "prefill", "p", "redis://r", "cpu"), worker_spec(c, "decode", "d", "redis://r", "cpu")
    assert (p.port, p.kv_port, d.port, d.kv_port) == (50061, None, 50061, 50062)
    registry = Registry(redis_url, c.name)
    registry.clear()
    controller = Controller(c, FakeBackend(registry), registry, redis_url, device="cuda")
    assert controller.resources("decode").custom == {"splitserve_decode": 1.0} and controller.resources("decode").num_gpus == 1.0
    assert controller.resources("prefill").custom == {"splitserve_prefill": 1.0}


# ---- engine kernels --------------------------------------------------------------------------
def test_the_engine_kernels_reach_every_worker_from_cluster_yaml_and_from_worker_flags() -> None:
    """A kernel named in cluster.yaml, to `splitserve serve` or on a worker's command line is
    the one its engine runs (the worker flags were once accepted and silently dropped)."""
    c = parse({"model": {"path": "m", "linear_kernel": "onednn", "attention_backend": "torch"}})
    for role in ("prefill", "decode"):
        cfg = worker_spec(c, role, role[0], "redis://r", "cpu").engine_config()
        assert (cfg.linear_kernel, cfg.attention_backend) == ("onednn", "torch")
    default = worker_spec(parse({}), "decode", "d", "redis://r", "cpu").engine_config()
    assert (default.linear_kernel, default.attention_backend, default.cuda_graphs) == ("torch", "auto", True)
    served = serve_config(build_parser().parse_args(["serve", "--model", "m", "--linear-kernel", "onednn"]))
    assert worker_spec(served, "prefill", "p", "redis://r", "cpu").engine_config().linear_kernel == "onednn"
    parser = worker_build_parser("decode")
    args = parser.parse_args(["--model", "m", "--linear-kernel", "onednn", "--attention-backend", "flashinfer", "--num-threads", "3", "--no-cuda-graphs"])
    cfg = spec_from_args("decode", args, parser).engine_config()
    assert (cfg.linear_kernel, cfg.attention_backend, cfg.num_threads, cfg.cuda_graphs) == ("onednn", "flashinfer", 3, False)


def test_cluster_yaml_names_the_engine_kernels_the_engine_has() -> None:
    from splitserve.engine.config import ATTENTION_BACKENDS, LINEAR_KERNELS

    hints = typing.get_type_hints(ModelSection)
    assert typing.get_args(hints["linear_kernel"]) == LINEAR_KERNELS
    assert typing.get_args(hints["attention_backend"]) == ATTENTION_BACKENDS
    with pytest.raises(ConfigError) as e:
        parse({"model": {"path": "m", "linear_kernel": "mkl"}})
    assert e.value.key == "model.linear_kernel"


# ---- declared pool sizes ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_url():
    server = EmbeddedRedis()
    yield server.url
    server.stop()


def test_a_changed_config_size_wins_and_an_unchanged_one_keeps_a_users_scale(redis_url: str) -> None:
    registry = Registry(redis_url, "declare")
    registry.clear()
    registry.declare_targets({"prefill": 1, "decode": 2})
    assert registry.targets() == {"prefill": 1, "decode": 2}
    registry.set_target("decode", 5)  # `splitserve scale decode=5`
    registry.declare_targets({"prefill": 1, "decode": 2})  # the controller restarts, same file
    assert registry.targets() == {"prefill": 1, "decode": 5}
    registry.declare_targets({"prefill": 1, "decode": 3})  # a redeploy with decode.replicas: 3
    assert registry.targets() == {"prefill": 1, "decode": 3}


# ---- KV on its own port ----------------------------------------------------------------------
def _serving(address: str, service: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_decode_worker_with_kv_port_serves_kv_only_there(llama_dir: Path) -> None:
    runtime = WorkerRuntime(WorkerSpec(role="decode", worker_id="kvport", model=str(llama_dir), dtype="float32", num_kv_blocks=32, kv_port=0))
    try:
        assert runtime.kv_address != runtime.address
        assert runtime.worker.endpoints == {"grpc": runtime.kv_address, "torch": runtime.kv_address}
        assert _serving(runtime.address, "splitserve.worker.DecodeWorker") and not _serving(runtime.address, "splitserve.kv.KVTransfer")
        assert _serving(runtime.kv_address, "splitserve.kv.KVTransfer") and not _serving(runtime.kv_address, "splitserve.worker.DecodeWorker")
    finally:
        runtime.stop()


def test_up_can_leave_the_router_out() -> None:
    assert build_parser().parse_args(["up", "-f", "c.yaml", "--no-router"]).no_router is True
    assert build_parser().parse_args(["up", "-f", "c.yaml"]).no_router is False


# ---- waiting for Ray ---------------------------------------------------------------------------
class FlakyRay:
    """`ray.init` that fails as an unreachable cluster does, `failures` times."""

    def __init__(self, failures: int) -> None:
        self.failures, self.inits, self.shutdowns = failures, [], 0

    def init(self, **kwargs) -> None:
        self.inits.append(kwargs)
        if len(self.inits) <= self.failures:
            raise ConnectionError("ray client connection timeout")

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_up_waits_for_a_ray_cluster_that_is_not_reachable_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_backend, "CONNECT_RETRY_SECONDS", 0.01)
    ray = FlakyRay(failures=2)
    ray_backend.connect(ray, "ray://head:10001", timeout=60, namespace="n")
    assert len(ray.inits) == 3 and ray.shutdowns == 2 and ray.inits[-1] == {"address": "ray://head:10001", "namespace": "n"}


def test_up_gives_up_after_the_timeout_and_a_local_ray_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_backend, "CONNECT_RETRY_SECONDS", 0.01)
    with pytest.raises(ConnectionError):
        ray_backend.connect(FlakyRay(failures=1000), "ray://head:10001", timeout=0.1)
    local = FlakyRay(failures=1)
    with pytest.raises(ConnectionError):
        ray_backend.connect(local, None, timeout=60)
    assert len(local.inits) == 1
