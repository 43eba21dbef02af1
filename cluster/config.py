"""`cluster.yaml`: a tree of frozen dataclasses, loaded and validated once.

Validation is strict and says where: an unknown key, a wrong type or a value outside its
allowed set is a `ConfigError` naming the dotted key (e.g. `decode.replicas`) and what is
allowed. See `cluster.example.yaml` for every key with its default and meaning.

String values may refer to environment variables as `${NAME}` (`$$` is a literal `$`), expanded
once here, at load: how secrets (the cluster token, API keys, a Redis password) reach the
processes without being written into the file (on Kubernetes the file is a ConfigMap and the
secrets come from a Secret through the environment). A reference to an unset variable is an
error naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from splitserve.proto.tls import TLSFiles


class ConfigError(ValueError):
    status = "INVALID_ARGUMENT"

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # "auto" is resolved by the pool: 1 per worker when CUDA is present
    # Ray custom resources each worker (each rank of a CP group) asks for too: how a pool is pinned
    # to the nodes that advertise them, e.g. the Helm chart's prefill and decode worker groups.
    custom: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        for name, amount in self.custom.items():
            if not name or name in RAY_BUILTIN_RESOURCES:
                raise ConfigError(f"custom.{name}", f"is not a custom resource name (Ray's own {', '.join(RAY_BUILTIN_RESOURCES)} are set by num_cpus / num_gpus)")
            if amount <= 0:
                raise ConfigError(f"custom.{name}", f"must be > 0, got {amount}")


@dataclass(frozen=True)
class ModelSection:
    path: str = ""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the engine's kernels (engine/config.py): onednn packs the linear layers for oneDNN on CPU,
    # about 2x faster there, but float32 is then no longer bitwise equal to transformers
    linear_kernel: Literal["torch", "onednn"] = "torch"
    attention_backend: Literal["auto", "torch", "flash_attn", "flashinfer"] = "auto"


@dataclass(frozen=True)
class PrefillPool:
    replicas: int = 1
    resources: Resources = field(default_factory=Resources)
    max_prefill_chunk: int = 512
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int = 1 << 30  # bytes
    cp_degree: int = 1
    port: int = 0  # each worker's gRPC port; fixed (not 0) only with at most one worker per node


@dataclass(frozen=True)
class DecodePool:
    replicas: int = 1
    resources: Resources = field(default_factory=Resources)
    max_running_requests: int = 64
    kv_cache_memory: int = 1 << 30  # bytes
    port: int = 0
    kv_port: int | None = None  # None: KV on `port`; a port of its own lets a network policy keep the router off it


@dataclass(frozen=True)
class KVTransferSection:
    transport: Literal["torch", "grpc", "local"] = "grpc"
    lease_seconds: float = 30.0


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 5000.0  # a request's own slo_ttft_ms / slo_tpot_ms (API extension fields) override these
    tpot_ms: float = 500.0
    admission: bool = False  # refuse (429) a request whose predicted TTFT exceeds ttft_ms x slack because of queued work
    slack: float = 1.0


@dataclass(frozen=True)
class RoutingSection:
    """The workload-aware policy's knobs (router.policy: workload_aware)."""

    local_prefill_tokens: int = 256  # the decode worker prefills itself when it lacks at most this many prompt tokens
    balance_factor: float = 1.15  # no worker takes more than this x its share of recent requests
    balance_window: int = 64  # recent requests that share counts over
    index_capacity_blocks: int = 1_000_000  # the router's prefix index remembers this many block hashes at most
    transfer_bytes_per_s: float = 1e9  # the KV bandwidth assumed between a prefill and a decode worker until measured


@dataclass(frozen=True)
class RouterSection:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    policy: Literal["workload_aware", "least_loaded", "round_robin"] = "workload_aware"
    request_timeout_s: float = 600.0
    max_retries: int = 1
    # What one client can hold (router/http_limits.py): requests in flight on this router, over
    # both APIs (503 / UNAVAILABLE with Retry-After beyond it); a request's size (a 1M-token
    # prompt as JSON token ids is ~7 MiB); its request line and headers; how long its headers
    # and its body may take to arrive; how long a response may wait for a client that reads
    # nothing before the connection is dropped and the request aborted.
    max_concurrent_requests: int = 1024
    max_request_bytes: int = 8 << 20
    max_header_bytes: int = 16 << 10
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    send_timeout_s: float = 30.0
    # On SIGTERM / Ctrl-C a router stops taking requests and lets those in flight finish, for at
    # most this long (then they are aborted); 0: abort them at once
    drain_timeout_s: float = 30.0
    # Browser pages from these origins may call the HTTP API ("*": any); empty: no CORS headers,
    # so browsers refuse cross-origin calls (other clients are unaffected)
    cors_origins: list[str] = field(default_factory=list)


def cors_origin_ok(origin: str) -> bool:
    """An origin as browsers send it: scheme://host[:port], no path; or "*"."""
    return origin == "*" or re.fullmatch(r"https?://[^/\s*]+", origin) is not None


@dataclass(frozen=True)
class ClusterConfig:
    name: str = "splitserve"
    model: ModelSection = field(default_factory=ModelSection)
    prefill: PrefillPool = field(default_factory=PrefillPool)
    decode: DecodePool = field(default_factory=DecodePool)
    kv_transfer: KVTransferSection = field(default_factory=KVTransferSection)
    block_size: int = 16
    slo: SLO = field(default_factory=SLO)
    redis_url: str | None = None  # None: `splitserve serve` starts one for the run
    ray_address: str | None = None  # None: a local Ray instance
    router: RouterSection = field(default_factory=RouterSection)
    routing: RoutingSection = field(default_factory=RoutingSection)
    api_keys: list[str] = field(default_factory=list)
    # non-empty: the Admin API (scale, drain, shutdown, status) takes only these keys, and an API
    # key there is PERMISSION_DENIED; empty: the API keys (if any) may also administer the cluster
    admin_keys: list[str] = field(default_factory=list)
    max_replicas: int = 64  # per pool: what `splitserve scale` (Admin.Scale) and the config may ask for
    cluster_token: str | None = None
    tls: TLSFiles | None = None  # cert, key, ca (and server_name): TLS on the public endpoints and every gRPC port of the cluster
    heartbeat_seconds: float = 1.0
    heartbeat_ttl_seconds: float = 5.0
    max_restarts: int = 5  # per worker, by Ray, before the controller replaces it
    colocated: bool = False  # the baseline: decode.replicas workers that each prefill and decode, no prefill pool, no KV transfer

    def __post_init__(self) -> None:
        checks = [
            ("block_size", self.block_size > 0 and self.block_size & (self.block_size - 1) == 0, "a power of two > 0"),
            ("model.max_model_len", self.model.max_model_len is None or self.model.max_model_len > 0, "null or > 0"),
            ("prefill.kv_cache_memory", self.prefill.kv_cache_memory > 0, "> 0 bytes, e.g. 4GiB"),
            ("decode.kv_cache_memory", self.decode.kv_cache_memory > 0, "> 0 bytes, e.g. 4GiB"),
            ("router.request_timeout_s", self.router.request_timeout_s > 0, "> 0"),
            ("max_restarts", self.max_restarts >= 0, ">= 0"),
            ("prefill.replicas", self.prefill.replicas >= 0, ">= 0"),
            ("decode.replicas", self.decode.replicas >= 0, ">= 0"),
            ("prefill.cp_degree", self.prefill.cp_degree >= 1, ">= 1"),
            ("prefill.max_prefill_chunk", self.prefill.max_prefill_chunk > 0, "> 0"),
            ("prefill.max_num_batched_tokens", self.prefill.max_num_batched_tokens > 0, "> 0"),
            ("decode.max_running_requests", self.decode.max_running_requests > 0, "> 0"),
            ("kv_transfer.lease_seconds", self.kv_transfer.lease_seconds > 0, "> 0"),
            ("router.http_port", 0 <= self.router.http_port < 65536, "a port in 0..65535 (0 = any free)"),
            ("router.grpc_port", 0 <= self.router.grpc_port < 65536, "a port in 0..65535 (0 = any free)"),
            ("router.max_retries", self.router.max_retries >= 0, ">= 0"),
            ("router.drain_timeout_s", self.router.drain_timeout_s >= 0, ">= 0"),
            *((f"router.{k}", getattr(self.router, k) > 0, "> 0") for k in (
                "max_concurrent_requests", "max_request_bytes", "max_header_bytes", "header_timeout_s", "body_timeout_s", "send_timeout_s")),
            ("routing.local_prefill_tokens", self.routing.local_prefill_tokens >= 0, ">= 0 (0: never prefill on the decode worker)"),
            ("routing.balance_factor", self.routing.balance_factor >= 1.0, ">= 1.0"),
            ("routing.balance_window", self.routing.balance_window >= 1, ">= 1"),
            ("routing.index_capacity_blocks", self.routing.index_capacity_blocks >= 1, ">= 1"),
            ("routing.transfer_bytes_per_s", self.routing.transfer_bytes_per_s > 0, "> 0"),
            ("prefill.port", 0 <= self.prefill.port < 65536, "a port in 0..65535 (0 = any free)"),
            ("decode.port", 0 <= self.decode.port < 65536, "a port in 0..65535 (0 = any free)"),
            ("decode.kv_port", self.decode.kv_port is None or 0 <= self.decode.kv_port < 65536, "null or a port in 0..65535 (0 = any free)"),
            ("decode.kv_port", not self.decode.port or self.decode.kv_port != self.decode.port, "different from decode.port (null serves KV on decode.port)"),
            *((f"router.cors_origins[{i}]", cors_origin_ok(o), "an origin like https://app.example.com (scheme and host, no path) or *")
              for i, o in enumerate(self.router.cors_origins)),
            *((f"api_keys[{i}]", bool(k), "a non-empty string") for i, k in enumerate(self.api_keys)),
            *((f"admin_keys[{i}]", bool(k), "a non-empty string") for i, k in enumerate(self.admin_keys)),
            ("max_replicas", self.max_replicas >= 1, ">= 1"),
            ("prefill.replicas", self.prefill.replicas <= self.max_replicas, f"<= max_replicas ({self.max_replicas})"),
            ("decode.replicas", self.decode.replicas <= self.max_replicas, f"<= max_replicas ({self.max_replicas})"),
            ("heartbeat_ttl_seconds", self.heartbeat_ttl_seconds > self.heartbeat_seconds > 0, "> heartbeat_seconds > 0"),
            ("slo.ttft_ms", self.slo.ttft_ms > 0, "> 0"),
            ("slo.tpot_ms", self.slo.tpot_ms > 0, "> 0"),
            ("slo.slack", self.slo.slack > 0, "> 0"),
            ("decode.replicas", not self.colocated or self.decode.replicas >= 1, ">= 1 when colocated (the colocated workers)"),
            ("name", re.fullmatch(r"[A-Za-z0-9_-]+", self.name) is not None, "ASCII letters, digits, '-' and '_'"),
            *((f"tls.{name}", False, f"a readable PEM file, got {getattr(self.tls, name)!r}") for name in (self.tls.missing() if self.tls else ())),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(key, f"must be {allowed}")


def load_cluster_config(path: str | Path, overrides: dict[str, Any] | None = None, env: Mapping[str, str] | None = None) -> ClusterConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "must be a mapping at the top level")
    return parse_cluster_config(raw, overrides, env)


def parse_cluster_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None, env: Mapping[str, str] | None = None) -> ClusterConfig:
    """Build a validated config; `overrides` maps dotted keys to values (e.g. CLI flags); `${NAME}`
    in string values is looked up in `env` (default: this process's environment)."""
    raw = _merge(raw, overrides or {})
    config = _build(ClusterConfig, raw, "", os.environ if env is None else env)
    if not config.model.path:
        raise ConfigError("model.path", "is required: a Hugging Face checkpoint folder")
    return config


def _merge(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in overrides.items():
        node = out
        *parents, last = dotted.split(".")
        for i, p in enumerate(parents):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):  # e.g. `model: /path` in the file and --model given
                raise ConfigError(".".join(parents[: i + 1]), f"must be a mapping, got {type(child).__name__} {child!r}")
            node[p] = child = dict(child)
            node = child
        node[last] = value
    return out


def _build(cls: type, raw: Any, prefix: str, env: Mapping[str, str]) -> Any:
    where = prefix.rstrip(".") or "cluster.yaml"
    if not isinstance(raw, dict):
        raise ConfigError(where, f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names), key=str)
    if unknown:
        raise ConfigError(prefix + str(unknown[0]), f"unknown key; allowed keys here: {', '.join(names)}")
    kwargs = {name: _value(hints[name], raw[name], prefix + name, env) for name in names if name in raw}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix:
            raise ConfigError(prefix + e.key, str(e).split(": ", 1)[1]) from None
        raise


def _value(hint: Any, value: Any, key: str, env: Mapping[str, str]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _value(inner[0], value, key, env)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"{value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}")
        return [_value(args[0], v, f"{key}[{i}]", env) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{key}.{bad[0]}", "keys must be strings")
        return {k: _value(args[1], v, f"{key}.{k}", env) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", env)
    if hint is str and isinstance(value, str):
        return _expand(value, key, env)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if hint is int and isinstance(value, str) and value[-3:] in ("KiB", "MiB", "GiB"):
        return _bytes(value, key)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(key, f"must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(text: str, key: str, env: Mapping[str, str]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1)
        if name is None:  # "$$"
            return "$"
        if name not in env:
            raise ConfigError(key, f"refers to ${{{name}}}, which is not set in the environment")
        return env[name]

    return _ENV_REF.sub(one, text)


def _bytes(text: str, key: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    try:
        return int(float(text[:-3]) * units[text[-3:]])
    except (ValueError, OverflowError):  # OverflowError: 'infGiB'
        raise ConfigError(key, f"{text!r} is not a size like '512MiB'") from None
