"""The engine against Hugging Face transformers, the independent reference, on the very same
checkpoint folders: logits of one forward pass for every supported architecture and option,
greedy generation through the paged cache (batched, chunked) and a bfloat16 checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from splitserve.engine import LLM, SamplingParams  # noqa: E402
from splitserve.engine.tiny_checkpoint import CORPUS  # noqa: E402

MAX_NEW_TOKENS = 64
# ~50 tokens of text (encoded by Hugging Face's tokenizer for the reference) and 100 random ids
TEXT_PROMPT = CORPUS[:160]
RANDOM_PROMPT_LEN = 100
# Batch for generation: random-id prompts of these lengths plus two strings.
GENERATION_LENGTHS = (3, 17, 64, 129, 233, 300)
GENERATION_TEXTS = ("The quick brown fox", CORPUS[300:700])

HFModel = Callable[[Path, torch.dtype], "transformers.PreTrainedModel"]


def hf_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def random_prompt(length: int, path: Path, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hf_config(path)["vocab_size"], (length,), generator=g).tolist()


@pytest.fixture(scope="module")
def hf_model() -> HFModel:
    """`hf_model(folder, dtype)` -> the transformers model of that folder, loaded once per module."""
    loaded: dict[tuple[Path, torch.dtype], transformers.PreTrainedModel] = {}

    def get(path: Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
        if (path, dtype) not in loaded:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            assert model.dtype == dtype
            loaded[(path, dtype)] = model.eval()
        return loaded[(path, dtype)]

    return get


def hf_encode(path: Path, text: str) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(path)(text).input_ids


@torch.inference_mode()
def hf_logits(model: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:  # [T, vocab] float32
    return model(torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def hf_greedy(model: transformers.PreTrainedModel, ids: list[int]) -> list[int]:
    """MAX_NEW_TOKENS greedy tokens for one prompt, batch 1 (no padding), EOS not stopping it."""
    x = torch.tensor([ids])  # [1, T]
    # eos_token_id=None as a keyword overrides the checkpoint's generation_config (a
    # GenerationConfig object with eos None would be refilled from it). Not min_new_tokens:
    # that masks EOS out of the logits and so changes which token greedy picks.
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=None
    )
    new = out[0, len(ids) :].tolist()
    assert len(new) == MAX_NEW_TOKENS, "transformers stopped early: the comparison with ignore_eos would be unfair"
    return new


def assert_logits_match(llm: LLM, path: Path, hf: transformers.PreTrainedModel, **tol: float) -> None:
    """Logits at every position of a text prompt and of a random-id prompt."""
    text_ids = hf_encode(path, TEXT_PROMPT)
    assert llm.engine.tokenizer.encode(TEXT_PROMPT) == text_ids
    random_ids = random_prompt(RANDOM_PROMPT_LEN, path, seed=0)
    for prompt, ids in ((TEXT_PROMPT, text_ids), (random_ids, random_ids)):
        ours = llm.engine.score(prompt)  # [T, vocab]
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, hf_logits(hf, ids), **tol)


# ---- 1. logits of one forward pass, float32 --------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "llama3_gqa", "mistral", "mistral_swa", "qwen2"])
def test_logits_match_transformers(name: str, tiny_checkpoint: Callable[[str], Path], hf_model: HFModel) -> None:
    path = tiny_checkpoint(name)
    assert_logits_match(LLM(str(path), dtype="float32"), path, hf_model(path, torch.float32))


def test_llama3_rope_scaling_changes_frequencies_as_transformers_does(
    tiny_checkpoint: Callable[[str], Path], hf_model: HFModel
) -> None:
    path = tiny_checkpoint("llama3_gqa")
    ours = LLM(str(path), dtype="float32").engine.model.model.rotary_emb.inv_freq
    theirs = hf_model(path, torch.float32).model.rotary_emb.inv_freq
    torch.testing.assert_close(ours, theirs)
    raw = hf_config(path)
    assert raw["rope_scaling"]["rope_type"] == "llama3"
    head_dim = raw["head_dim"]
    unscaled = 1.0 / raw["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    changed = ~torch.isclose(ours, unscaled)
    assert 0 < int(changed.sum()) < len(unscaled)  # the checkpoint really exercises the scaling


def test_sliding_window_changes_only_positions_beyond_it(
    tiny_checkpoint: Callable[[str], Path], hf_model: HFModel
) -> None:
    """Same weights with and without a window of 8: equal up to position 7, different after,
    in the reference and in the engine (so the parity test above is not vacuous)."""
    full, swa = tiny_checkpoint("mistral"), tiny_checkpoint("mistral_swa")
    window = hf_config(swa)["sliding_window"]
    assert window == 8 and hf_config(full)["sliding_window"] is None
    ids = random_prompt(RANDOM_PROMPT_LEN, full, seed=1)
    for run in (
        lambda p: hf_logits(hf_model(p, torch.float32), ids),
        lambda p: LLM(str(p), dtype="float32").engine.score(ids),
    ):
        a, b = run(full), run(swa)
        torch.testing.assert_close(a[:window], b[:window])
        assert not torch.allclose(a[window:], b[window:], atol=1e-3, rtol=1e-3)


def test_sharded_checkpoint_loads_and_matches(tiny_checkpoint: Callable[[str], Path], hf_model: HFModel) -> None:
    path = tiny_checkpoint("llama_sharded")
    assert (path / "model.safetensors.index.json").is_file()
    assert not (path / "model.safetensors").exists()
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 3
    assert_logits_match(LLM(str(path), dtype="float32"), path, hf_model(path, torch.float32))


# ---- 2. greedy generation through the paged cache --------------------------------------------


@pytest.fixture(scope="module")
def hf_generations(hf_model: HFModel) -> Callable[[Path], list[tuple[list[int], list[int]]]]:
    """`hf_generations(folder)` -> (prompt ids, greedy tokens) for each prompt of
    `generation_prompts`, computed once per checkpoint."""
    done: dict[Path, list[tuple[list[int], list[int]]]] = {}

    def get(path: Path) -> list[tuple[list[int], list[int]]]:
        if path not in done:
            model = hf_model(path, torch.float32)
            prompt_ids = [p if isinstance(p, list) else hf_encode(path, p) for p in generation_prompts(path)]
            done[path] = [(ids, hf_greedy(model, ids)) for ids in prompt_ids]
            # a model that repeats one token would agree with almost any decode path
            assert all(len(set(tokens)) > 8 for _, tokens in done[path]), "degenerate reference output"
        return done[path]

    return get


def generation_prompts(path: Path) -> list[list[int] | str]:
    prompts: list[list[int] | str] = [random_prompt(n, path, seed) for seed, n in enumerate(GENERATION_LENGTHS)]
    prompts[3:3] = GENERATION_TEXTS  # strings mid-batch, not only at the end
    return prompts


@pytest.mark.parametrize(
    "name, engine_kwargs",
    [
        ("llama3_gqa", {}),
        ("qwen2_untied", {}),
        ("mistral_swa", {}),
        ("llama3_gqa", {"max_prefill_chunk": 7, "block_size": 8}),
        ("mistral_swa", {"max_prefill_chunk": 7, "block_size": 8}),
    ],
    ids=["llama3_gqa", "qwen2_untied", "mistral_swa", "llama3_gqa-chunk7-block8", "mistral_swa-chunk7-block8"],
)
def test_greedy_generation_matches_transformers(
    name: str,
    engine_kwargs: dict[str, int],
    tiny_checkpoint: Callable[[str], Path],
    hf_generations: Callable[[Path], list[tuple[list[int], list[int]]]],
) -> None:
    """A batch of 8 prompts (3..300 tokens) in one `generate` call, against transformers run
    one prompt at a time."""
    path = tiny_checkpoint(name)
    llm = LLM(str(path), dtype="float32", **engine_kwargs)
    prompts = generation_prompts(path)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    for i, (out, (ref_prompt, ref_tokens)) in enumerate(zip(outs, hf_generations(path), strict=True)):
        assert out.prompt_token_ids == ref_prompt
        first_diff = next((k for k, (a, b) in enumerate(zip(out.token_ids, ref_tokens)) if a != b), None)
        assert out.token_ids == ref_tokens, (
            f"prompt {i} ({len(ref_prompt)} tokens): first differs at output token {first_diff}"
        )


# ---- 3. bfloat16 ----------------------------------------------------------------------------


def test_bfloat16_checkpoint_loads_as_bfloat16_and_logits_are_close(
    tiny_checkpoint: Callable[[str], Path], hf_model: HFModel
) -> None:
    """bf16 keeps 8 significant bits (a relative step of 2**-8 ~ 4e-3). The engine rounds at
    different points than transformers (fused q/k/v and gate/up matmuls, its own attention
    masking and SDPA call), and those one-ulp differences compound over the layers, so exact
    equality is not expected. 2e-2 is a few bf16 steps for logits of magnitude ~1-5; a real
    bug (wrong RoPE, missing bias, wrong mask) moves logits by O(1)."""
    path = tiny_checkpoint("llama_bf16")
    llm = LLM(str(path), dtype="auto")
    assert llm.engine.dtype == torch.bfloat16
    assert {p.dtype for p in llm.engine.model.parameters()} == {torch.bfloat16}
    assert_logits_match(llm, path, hf_model(path, torch.bfloat16), atol=2e-2, rtol=2e-2)
