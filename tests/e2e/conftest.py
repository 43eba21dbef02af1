"""Worker processes shared by the end-to-end tests of a module, always cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.procs import Proc, start


@pytest.fixture(scope="session")
def e2e_model(make_checkpoint: Callable[..., Path]) -> Path:
    """A 2-layer GQA Llama with room for 2,000-token prompts."""
    return make_checkpoint(arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, max_position_embeddings=4096, seed=11)


@pytest.fixture(scope="module")
def spawn() -> Iterator[Callable[..., Proc]]:
    """`spawn(module, *args)` starts a worker process that is stopped when the module ends."""
    procs: list[Proc] = []

    def run(module: str, *args: str) -> Proc:
        proc = start(module, *args)
        procs.append(proc)
        return proc

    yield run
    for p in procs:
        p.stop()
