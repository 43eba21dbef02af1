"""cluster.yaml: the shipped example loads; every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.cluster.config import ConfigError, load_cluster_config, parse_cluster_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_annotated_example_loads_with_documented_values() -> None:
    c = load_cluster_config(ROOT / "cluster.example.yaml")
    assert c.model.path == "/models/Llama-3.2-1B" and c.kv_transfer.transport == "grpc"
    assert c.prefill.kv_cache_memory == 1 << 30 and c.router.policy == "workload_aware" and c.routing.local_prefill_tokens == 256
    assert parse_cluster_config({"model": {"path": "x"}}) == parse_cluster_config({"model": {"path": "x"}, "block_size": 16})


@pytest.mark.parametrize("raw, key, fragment", [
    ({"model": {"path": "m"}, "decode": {"replicaz": 2}}, "decode.replicaz", "allowed keys here: replicas"),
    ({"model": {"path": "m"}, "colour": "blue"}, "colour", "unknown key"),
    ({"model": {"path": "m"}, "kv_transfer": {"transport": "carrier-pigeon"}}, "kv_transfer.transport", "'torch', 'grpc', 'local'"),
    ({"model": {"path": "m"}, "decode": {"replicas": "two"}}, "decode.replicas", "must be int"),
    ({"model": {"path": "m"}, "decode": {"replicas": -1}}, "decode.replicas", ">= 0"),
    ({"model": {"path": "m"}, "block_size": 12}, "block_size", "power of two"),
    ({"model": {"path": "m"}, "router": {"grpc_port": 70000}}, "router.grpc_port", "0..65535"),
    ({"model": {"path": "m"}, "prefill": {"kv_cache_memory": "lots"}}, "prefill.kv_cache_memory", "must be int"),
    ({"model": {"path": "m"}, "api_keys": "secret"}, "api_keys", "must be a list"),
    ({"model": {"path": "m"}, "router": {"cors_origins": ["https://ok.example", "https://app.example.com/"]}}, "router.cors_origins[1]", "no path"),
    ({"model": {"path": "m", "dtype": "int3"}}, "model.dtype", "'auto'"),
    ({}, "model.path", "is required"),
    ({"model": {"path": "m"}, "decode": {"kv_cache_memory": "infGiB"}}, "decode.kv_cache_memory", "not a size"),
    ({"model": {"path": "m"}, "prefill": {"kv_cache_memory": "-1GiB"}}, "prefill.kv_cache_memory", "> 0"),
    ({"model": {"path": "m", "max_model_len": -3}}, "model.max_model_len", "> 0"),
    ({"model": {"path": "m"}, "router": {"request_timeout_s": -5}}, "router.request_timeout_s", "> 0"),
    ({"model": {"path": "m"}, "decode": {"resources": {"num_cpus": -2}}}, "decode.resources.num_cpus", ">= 0"),
    ({"model": {"path": "m"}, "max_restarts": -1}, "max_restarts", ">= 0"),
    ({"model": {"path": "m"}, "kv_transfer": {"lease_seconds": float("inf")}}, "kv_transfer.lease_seconds", "finite"),
    ({"model": {"path": "m"}, "name": "é"}, "name", "ASCII"),
    ({"model": {"path": "m"}, 1: 2, "foo": 3}, "1", "unknown key"),  # keys of mixed types: named, not a TypeError
    ({"model": {"path": "m"}, "prefill": {"resources": {"num_tpus": 1}}}, "prefill.resources.num_tpus", "num_cpus, num_gpus"),
])
def test_errors_name_the_key_and_the_allowed_values(raw: dict, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_cluster_config(raw)
    assert e.value.key == key and fragment in str(e.value)


def test_an_override_inside_a_section_written_as_a_scalar_names_the_section() -> None:
    for raw, override, key in (({"model": "/m"}, {"model.path": "/m"}, "model"), ({"model": {"path": "m"}, "prefill": 3}, {"prefill.replicas": 2}, "prefill")):
        with pytest.raises(ConfigError, match="must be a mapping") as e:
            parse_cluster_config(raw, override)
        assert e.value.key == key


def test_overrides_use_dotted_keys_and_are_validated_too() -> None:
    c = parse_cluster_config({"model": {"path": "m"}}, {"decode.replicas": 3, "router.http_port": 0})
    assert c.decode.replicas == 3 and c.router.http_port == 0
    with pytest.raises(ConfigError) as e:
        parse_cluster_config({"model": {"path": "m"}}, {"prefill.replicas": "many"})
    assert e.value.key == "prefill.replicas"


def test_sizes_and_bad_yaml(tmp_path: Path) -> None:
    assert parse_cluster_config({"model": {"path": "m"}, "decode": {"kv_cache_memory": "512MiB"}}).decode.kv_cache_memory == 512 << 20
    bad = tmp_path / "c.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_cluster_config(bad)
