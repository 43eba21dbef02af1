"""Sampling: seeds, filters, stop conditions, logprobs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from splitserve.engine import LLM, SamplingParams
from splitserve.engine.sampler import SampleRow, sample
from splitserve.engine.sampling_params import FLOAT32_TINY

PROMPT = [5, 17, 300, 42, 8, 99, 123]


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), dtype="float32")


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates(llm: LLM) -> None:
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=32, ignore_eos=True)
    alone = llm.generate([PROMPT], p)[0].token_ids
    mates = [[9, 9, 9], list(range(40, 90))]
    crowd = llm.generate([mates[0], PROMPT, mates[1]], [SamplingParams(temperature=0.7, seed=5, max_tokens=40), p, SamplingParams(temperature=1.3, max_tokens=10)])
    assert crowd[1].token_ids == alone
    other = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=4321, max_tokens=32, ignore_eos=True))[0]
    assert other.token_ids != alone  # a different seed draws differently (32 draws: equal only by absurd chance)


def test_top_k_one_and_tiny_top_p_are_greedy(llm: LLM) -> None:
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].token_ids
    k1 = llm.generate([PROMPT], SamplingParams(temperature=2.0, top_k=1, seed=1, max_tokens=16, ignore_eos=True))[0].token_ids
    p0 = llm.generate([PROMPT], SamplingParams(temperature=2.0, top_p=1e-6, seed=1, max_tokens=16, ignore_eos=True))[0].token_ids
    assert k1 == greedy and p0 == greedy


@pytest.mark.parametrize("temperature", [1e-40, FLOAT32_TINY, 1e-30, 1e-6])
def test_a_vanishing_temperature_is_greedy(llm: LLM, temperature: float) -> None:
    """Logits divided by 1e-40 overflow float32: every draw was token 0. Below vLLM's 1e-5 the
    request samples the most likely token, as temperature 0 does."""
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].token_ids
    tiny = llm.generate([PROMPT], SamplingParams(temperature=temperature, seed=3, max_tokens=16, ignore_eos=True))[0].token_ids
    assert tiny == greedy


def test_sampler_respects_top_k_support() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    allowed = set(logits[0].topk(5).indices.tolist())
    seen = set()
    for i in range(200):
        seen.add(sample(logits, [SampleRow(SamplingParams(temperature=5.0, top_k=5, seed=i), 0)]).tokens[0])
    assert seen <= allowed and len(seen) > 1


def test_sampler_respects_top_p_mass() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0, -2.0]])  # p ~ [.50, .45, .02, .01, .003]
    seen = {sample(logits, [SampleRow(SamplingParams(top_p=0.9, seed=i), 0)]).tokens[0] for i in range(200)}
    assert seen == {0, 1}


def test_logprobs_are_those_of_the_model(llm: LLM) -> None:
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    logits = llm.engine.score(PROMPT + out.token_ids[:-1])
    expected = torch.log_softmax(logits[len(PROMPT) - 1 :], dim=-1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert math.isclose(lp, expected[i, tok].item(), abs_tol=1e-4)
        assert lp <= 0.0


def test_stop_token_ids_and_eos(llm: LLM) -> None:
    free = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    assert llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].finish_reason == "length"


def test_stop_strings_cut_the_text(llm: LLM) -> None:
    free = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    text = free.text
    assert len(text) > 6
    stop = text[4:7]
    cut = text.index(stop)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "never-there"]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:cut]
    assert stop not in out.text
    assert free.token_ids[: len(out.token_ids)] == out.token_ids  # generation stopped, not changed


def test_incremental_text_equals_full_decode(llm: LLM) -> None:
    out = llm.generate(["Les modèles 日本語 🙂"], SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True))[0]
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_incremental_text_is_the_whole_decode(llama_dir) -> None:
    """Streamed deltas add up to decoding the ids at once, except for a last character whose
    bytes have not all arrived: held back rather than emitted broken. (Random ids also make
    invalid byte sequences, which both decode to replacement characters in the middle.)"""
    import random

    from splitserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

    tok = Tokenizer(llama_dir)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(2, tok.vocab_size) for _ in range(rng.randint(1, 120))]
        det = IncrementalDetokenizer(tok, skip_special_tokens=False)
        streamed = "".join(det.push(i) for i in ids)
        whole = tok.decode(ids, skip_special_tokens=False)
        assert whole.startswith(streamed) and set(whole[len(streamed):]) <= {"\ufffd"}
