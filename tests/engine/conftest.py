"""Shared engine-test fixtures: tiny random-weight Hugging Face checkpoints, each written once
per test session into its own temporary folder (never downloaded)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from splitserve.engine.tiny_checkpoint import TinySpec

# One entry per model variant the tests compare against transformers. "mistral" and
# "mistral_swa" share a seed (so the same weights) and differ only in the sliding window, which
# lets a test check that the window really changes the output.
TINY_SPECS: dict[str, TinySpec] = {
    "llama": TinySpec(arch="llama", num_heads=4, num_kv_heads=4, seed=1),
    # head_dim 16 and an original context of 4096 // 8 = 512: llama3 scaling rescales the
    # RoPE frequencies whose wavelength exceeds 512 / high_freq_factor = 128, 5 of the 8.
    "llama3_gqa": TinySpec(
        arch="llama",
        hidden_size=128,
        num_heads=8,
        num_kv_heads=2,
        rope_scaling="llama3",
        max_position_embeddings=4096,
        seed=2,
    ),
    "mistral": TinySpec(arch="mistral", num_heads=4, num_kv_heads=2, seed=3),
    "mistral_swa": TinySpec(arch="mistral", num_heads=4, num_kv_heads=2, sliding_window=8, seed=3),
    "qwen2": TinySpec(arch="qwen2", num_heads=4, num_kv_heads=2, seed=4),  # q/k/v bias, tied embeddings
    # For generation: with tied embeddings the N(0, 1) embedding rows are also the output
    # projection, the last token's own logit dominates and greedy decoding repeats one token,
    # which would leave the decode path untested. Untied, the output varies.
    "qwen2_untied": TinySpec(arch="qwen2", num_heads=4, num_kv_heads=2, tie_word_embeddings=False, seed=4),
    # 32 KiB shards against a 128 KiB embedding and 16-32 KiB per projection: about a dozen files
    "llama_sharded": TinySpec(arch="llama", num_heads=4, num_kv_heads=2, seed=5, shard_size=32 * 1024),
    "llama_bf16": TinySpec(arch="llama", num_heads=4, num_kv_heads=2, dtype="bfloat16", seed=6),
}


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint: Callable[..., Path]) -> Callable[[str], Path]:
    """`tiny_checkpoint(name)` -> folder of the checkpoint `TINY_SPECS[name]`, written on first use
    (through `make_checkpoint`, so a spec shared with other tests is written once)."""

    def get(name: str) -> Path:
        return make_checkpoint(**dataclasses.asdict(TINY_SPECS[name]))

    return get
