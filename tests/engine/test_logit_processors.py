"""The sampler's logit processors and top logprobs: the repetition penalty against transformers'
implementation, frequency / presence penalties against their definition (OpenAI's), logit
bias, min_tokens, and top logprobs against the model's own distribution."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from splitserve.engine import LLM, SamplingParams
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampler import SampleRow, sample

transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 300, 42, 8, 99, 123, 17, 17, 42]


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), dtype="float32")


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_generates_what_transformers_generates(llm: LLM, llama_dir: Path, penalty: float) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        hf = model.generate(torch.tensor([PROMPT]), max_new_tokens=40, do_sample=False, repetition_penalty=penalty,
                            eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    ours = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=penalty))[0].token_ids
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].token_ids
    assert ours == hf
    assert ours != plain  # the penalty changed the output, so the comparison above tested it


def test_frequency_and_presence_penalties_follow_their_definition() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 64)
    outputs = [[3, 3, 5, 9, 3], [], [7, 7, 7, 7]]
    params = [SamplingParams(temperature=0, frequency_penalty=0.6, presence_penalty=0.3),
              SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0),
              SamplingParams(temperature=0, frequency_penalty=-0.5, presence_penalty=-1.0)]
    logits[0, 3], logits[0, 4] = 10.0, 9.0  # 3 leads, until its penalty (3 * 0.6 + 0.3) drops it below 4
    logits[2, 7], logits[2, 8] = 5.0, 7.5  # a negative penalty lifts 7 above 8
    rows = [SampleRow(p, len(o), [1, 2], o) for p, o in zip(params, outputs)]
    expected = []
    for row, out in zip(logits, outputs):
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=64).float()
        p = params[len(expected)]
        expected.append(int(torch.argmax(row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float())))
    got = sample(logits, rows)
    assert got.tokens == expected == [4, int(torch.argmax(logits[1])), 7]
    # the logprobs reported are the model's, before any processing
    assert got.logprobs == pytest.approx(torch.log_softmax(logits, -1).gather(1, torch.tensor(expected)[:, None])[:, 0].tolist())


def test_logit_bias_forces_and_forbids_tokens(llm: LLM) -> None:
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].token_ids
    forced = llm.generate([PROMPT], SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True, logit_bias={77: 100}))[0]
    assert forced.token_ids == [77] * 12
    banned = set(plain)
    avoided = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias={t: -100 for t in banned}))[0]
    assert not banned & set(avoided.token_ids)


def test_min_tokens_holds_back_eos_and_stop_ids(llm: LLM) -> None:
    eos = llm.engine.model_config.eos_token_ids[0]
    eager = SamplingParams(temperature=0, max_tokens=20, logit_bias={eos: 100})
    assert llm.generate([PROMPT], eager)[0].token_ids == [eos]
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, logit_bias={eos: 100}, min_tokens=6))[0]
    assert len(out.token_ids) == 7 and out.token_ids[-1] == eos and eos not in out.token_ids[:-1] and out.finish_reason == "stop"
    stop_id = 123
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, logit_bias={stop_id: 100}, stop_token_ids=[stop_id], min_tokens=4))[0]
    assert out.token_ids[-1] == stop_id and len(out.token_ids) == 5


def test_top_logprobs_are_the_models_most_likely_tokens(llm: LLM) -> None:
    params = [SamplingParams(temperature=0.7, seed=8, max_tokens=6, ignore_eos=True, top_logprobs=5),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, top_logprobs=2),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    outs = llm.generate([PROMPT, PROMPT[:5], PROMPT[2:]], params)
    for prompt, p, out in zip([PROMPT, PROMPT[:5], PROMPT[2:]], params, outs):
        reference = torch.log_softmax(llm.engine.score(prompt + out.token_ids[:-1])[len(prompt) - 1 :], dim=-1)
        assert len(out.top_logprobs) == len(out.token_ids)
        for i, top in enumerate(out.top_logprobs):
            assert len(top) == p.top_logprobs
            values, ids = reference[i].topk(p.top_logprobs) if p.top_logprobs else (torch.empty(0), torch.empty(0))
            assert [t for t, _ in top] == ids.tolist()
            assert all(math.isclose(lp, v, abs_tol=1e-4) for (_, lp), v in zip(top, values.tolist()))
            if p.greedy and top:
                assert top[0][0] == out.token_ids[i]  # greedy picks the most likely


@pytest.mark.parametrize("field, value, message", [
    ("repetition_penalty", 0.0, "must be > 0"), ("frequency_penalty", 2.5, r"\[-2, 2\]"), ("presence_penalty", "1", "must be a number"),
    ("top_logprobs", 21, r"\[0, 20\]"), ("min_tokens", 17, "at most max_tokens"), ("logit_bias", {5: 101}, r"\[-100, 100\]"),
    ("logit_bias", {-1: 1}, r"\[0, 2147483647\] \(token ids\)"), ("logit_bias", [5, 6], "must map token ids"),
])
def test_bad_processor_values_name_the_field(field: str, value, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field


def test_logit_bias_beyond_the_vocabulary_is_refused(llm: LLM) -> None:
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError, match="logit_bias") as e:
        llm.generate([PROMPT], SamplingParams(logit_bias={vocab: 1.0}))
    assert e.value.field == "logit_bias"
