"""Greedy tokens must not depend on how the engine batches, chunks, pages or caches.

The reference is the same engine serving each prompt alone, whole, with no prefix cache.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from splitserve.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def prompts(n: int, seed: int = 1, lo: int = 1, hi: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> dict[tuple[int, ...], list[int]]:
    llm = LLM(str(llama_dir), dtype="float32", enable_prefix_caching=False, max_num_seqs=1)
    ps = prompts(8) + SHARED
    return {tuple(p): llm.generate([p], GREEDY)[0].token_ids for p in ps}


_PREFIX = [7 + (i * 13) % 400 for i in range(96)]
SHARED = [_PREFIX + [11, 12, 13], _PREFIX + [14, 15]]


def assert_matches(outs, ps, reference) -> None:
    for p, out in zip(ps, outs):
        assert out.token_ids == reference[tuple(p)], f"prompt of {len(p)} tokens diverged"


@pytest.mark.parametrize("chunk", [7, 64, None])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_chunk_size_and_block_size_do_not_change_tokens(llama_dir: Path, reference, chunk, block_size) -> None:
    llm = LLM(str(llama_dir), dtype="float32", block_size=block_size, max_prefill_chunk=chunk)
    ps = prompts(8)
    assert_matches(llm.generate(ps, GREEDY), ps, reference)
    pool = llm.engine.pool
    assert pool.num_free == pool.num_blocks


def test_batch_mates_do_not_change_tokens(llama_dir: Path, reference) -> None:
    llm = LLM(str(llama_dir), dtype="float32", max_num_batched_tokens=96)
    ps = prompts(8)
    # different mates and order, with requests of other lengths and sampling mixed in
    noisy = [SamplingParams(temperature=1.0, seed=i, max_tokens=30) for i in range(3)]
    mixed = ps[::-1] + prompts(3, seed=9)
    params = [GREEDY] * 8 + noisy
    outs = llm.generate(mixed, params)
    assert_matches(outs[:8], ps[::-1], reference)


def test_prefix_cache_hits_are_reused_and_exact(llama_dir: Path, reference) -> None:
    llm = LLM(str(llama_dir), dtype="float32", block_size=16)
    first = llm.generate([SHARED[0]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    second = llm.generate([SHARED[1]], GREEDY)[0]
    assert second.num_cached_tokens == 96  # six full blocks of the shared prefix were reused
    assert first.token_ids == reference[tuple(SHARED[0])]
    assert second.token_ids == reference[tuple(SHARED[1])]
    # the very same prompt again: all but the last block hit
    again = llm.generate([SHARED[0]], GREEDY)[0]
    assert again.num_cached_tokens == 96 and again.token_ids == first.token_ids


def test_preemption_under_memory_pressure_keeps_tokens(llama_dir: Path, reference) -> None:
    # 40 blocks of 8 tokens hold 320 tokens: eight requests of up to 224 tokens cannot all fit.
    llm = LLM(str(llama_dir), dtype="float32", block_size=8, num_kv_blocks=40)
    ps = prompts(8)
    outs = llm.generate(ps, GREEDY)
    assert sum(o.metrics["preemptions"] for o in outs) > 0, "the test must actually preempt"
    assert_matches(outs, ps, reference)
    assert llm.engine.pool.num_free == 40


def test_abort_frees_every_block(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), dtype="float32")
    engine = llm.engine
    for i, p in enumerate(prompts(6)):
        engine.add_request(str(i), p, GREEDY)
    engine.step()
    engine.step()
    assert engine.pool.num_used > 0
    for i in range(6):
        engine.abort_request(str(i))
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free == engine.pool.num_blocks
