"""The router's limits in cluster.yaml: the example documents the defaults; each must be > 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.cluster.config import ConfigError, RouterSection, load_cluster_config, parse_cluster_config

ROOT = Path(__file__).resolve().parents[2]
LIMITS = ["max_concurrent_requests", "max_request_bytes", "max_header_bytes", "header_timeout_s", "body_timeout_s", "send_timeout_s"]


def test_the_example_documents_the_defaults() -> None:
    example = load_cluster_config(ROOT / "cluster.example.yaml").router
    assert {k: getattr(example, k) for k in LIMITS} == {k: getattr(RouterSection(), k) for k in LIMITS}
    assert example.max_request_bytes == 8 << 20 and example.max_header_bytes == 16 << 10


@pytest.mark.parametrize("key", LIMITS)
def test_each_limit_must_be_positive(key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_cluster_config({"model": {"path": "m"}, "router": {key: 0}})
    assert e.value.key == f"router.{key}" and "> 0" in str(e.value)
