"""A request continued on another engine after `k` of its tokens (a decode failover) produces
exactly the tokens the uninterrupted request would have: greedy and seeded sampling, stop
strings across the boundary, max_tokens counted over both parts; directly and through the
prefill / decode halves."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.engine import LLM, LLMEngine, SamplingParams
from splitserve.engine.config import EngineConfig
from splitserve.engine.errors import InvalidRequestError

PROMPT = [3 + (i * 13) % 480 for i in range(70)]
CASES = {
    "greedy": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    "seeded": SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True),
    # the penalties read the output so far: a continuation's prefix must count as output
    "penalized": SamplingParams(temperature=0.8, seed=99, max_tokens=24, ignore_eos=True, repetition_penalty=1.4,
                                frequency_penalty=0.7, presence_penalty=0.5, logit_bias={11: 2.0}, top_logprobs=3),
}


def engine(llama_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(llama_dir), dtype="float32"))


def run(e: LLMEngine, rid: str) -> list[int]:
    while True:
        for out in e.step():
            if out.request_id == rid and out.finished:
                return out.token_ids


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [1, 9, 23])
def test_continuation_equals_the_uninterrupted_request(llama_dir: Path, case: str, k: int) -> None:
    params = CASES[case]
    whole = LLM(str(llama_dir), dtype="float32").generate([PROMPT], params)[0].token_ids
    e = engine(llama_dir)
    e.add_request("cont", PROMPT, params, output_prefix=whole[:k])
    assert run(e, "cont") == whole


@pytest.mark.parametrize("case", sorted(CASES))
def test_continuation_through_the_disaggregated_halves(llama_dir: Path, case: str) -> None:
    params, k = CASES[case], 7
    whole = LLM(str(llama_dir), dtype="float32").generate([PROMPT], params)[0].token_ids
    prefill, decode = engine(llama_dir), engine(llama_dir)
    prefill.add_request("c", PROMPT, params, prefill_only=True, output_prefix=whole[:k])
    first = next(o for o in iter(prefill.step, None) if o and o[0].finished)[0]
    assert first.token_ids == whole[: k + 1] and first.new_token_ids == [whole[k]]
    r = decode.reserve("c", PROMPT, params.max_tokens, output_prefix=whole[:k])
    for layer in range(prefill.model_config.num_layers):
        decode.write_kv(layer, r.block_ids, prefill.read_kv(layer, first.kv_block_ids))
    prefill.release("c")
    out = decode.admit_prefilled("c", PROMPT, whole[k], params, output_prefix=whole[:k])
    assert out.token_ids == whole[: k + 1]
    assert run(decode, "c") == whole


def test_a_stop_string_across_the_boundary_is_found(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), dtype="float32")
    base = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate([PROMPT], base)[0]
    stop = full.text[len(full.text) // 2 - 2 : len(full.text) // 2 + 2]  # four characters in the middle of the text
    stopped = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=(stop,)))[0]
    assert stopped.finish_reason == "stop"
    # continue just before the stop string completes: the continuation must still stop there
    tok = llm.tokenizer
    k = next(i for i in range(len(full.token_ids)) if stop in tok.decode(full.token_ids[: i + 1])) - 1
    e = engine(llama_dir)
    e.add_request("s", PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=(stop,)), output_prefix=full.token_ids[:k])
    while True:
        outs = [o for o in e.step() if o.request_id == "s" and o.finished]
        if outs:
            break
    assert outs[0].finish_reason == "stop" and outs[0].token_ids == stopped.token_ids


def test_a_prefix_as_long_as_max_tokens_is_refused(llama_dir: Path) -> None:
    with pytest.raises(InvalidRequestError, match="output_prefix"):
        engine(llama_dir).add_request("x", PROMPT, SamplingParams(max_tokens=3), output_prefix=[5, 6, 7])
