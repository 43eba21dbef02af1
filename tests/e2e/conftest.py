"""Worker processes shared by the end-to-end tests of a module, always cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from splitserve.cluster.redis_server import EmbeddedRedis
from tests.e2e.local_cluster import LocalCluster
from tests.e2e.procs import Proc, start


@pytest.fixture(scope="session")
def e2e_model(make_checkpoint: Callable[..., Path]) -> Path:
    """A 2-layer GQA Llama with room for 2,000-token prompts."""
    return make_checkpoint(arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, max_position_embeddings=4096, seed=11)


@pytest.fixture(scope="module")
def served(e2e_model: Path):
    """`splitserve serve` on the e2e model for a module, every request disaggregated."""
    from tests.e2e.serve_proc import start_serve

    serve = start_serve("--model", str(e2e_model), "--dtype", "float32", "--local-prefill-tokens", "0")
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def single(e2e_model: Path):
    """The reference: one engine in this process, on the same checkpoint."""
    from splitserve.engine import LLM

    return LLM(str(e2e_model), dtype="float32")


@pytest.fixture(scope="module")
def oai(served):
    """The official openai client against `served`."""
    import openai

    return openai.OpenAI(base_url=served.http + "/v1", api_key="unused", timeout=60, max_retries=0)


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


@pytest.fixture(scope="session")
def redis() -> Iterator[EmbeddedRedis]:
    """One Redis for the session; each LocalCluster has its own namespace in it."""
    r = EmbeddedRedis()
    yield r
    r.stop()


@pytest.fixture
def make_cluster(e2e_model: Path, tmp_path: Path, redis: EmbeddedRedis) -> Iterator[Callable[..., LocalCluster]]:
    """`make_cluster(model=..., router={...}, **cluster.yaml keys)`: routers and hand-started workers
    joined through Redis (see LocalCluster.start); stopped when the test ends."""
    made: list[LocalCluster] = []

    def make(model: Path | None = None, **config) -> LocalCluster:
        made.append(LocalCluster(model or e2e_model, tmp_path, redis, **config))
        return made[-1]

    yield make
    for c in made:
        c.close()
