"""Shared fixtures: tiny random-weight checkpoints written once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from splitserve.engine.tiny_checkpoint import TinySpec, write_tiny_checkpoint


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_checkpoint(arch="llama", **spec)` -> folder of a checkpoint, cached per spec."""
    made: dict[TinySpec, Path] = {}

    def make(**kwargs) -> Path:
        spec = TinySpec(**kwargs)
        if spec not in made:
            made[spec] = write_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{spec.arch}"), spec)
        return made[spec]

    return make


@pytest.fixture(scope="session")
def llama_dir(make_checkpoint: Callable[..., Path]) -> Path:
    """The default small Llama (GQA 4:2, 2 layers) used by most engine tests."""
    return make_checkpoint(arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)
