"""Returned text leaves out special tokens (EOS, BOS, pad) on every path — offline, HTTP
(completions, streamed and not) and the gRPC SDK — and shows them when a request
asks (`skip_special_tokens: false`).

The checkpoint's EOS here is an ordinary vocabulary token that the model emits greedily, and
the tokenizer does not mark it special: the case where text used to end in the EOS token's
text. Special ids come from the checkpoint's configs, not only from the tokenizer's flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest

from splitserve.engine import LLM, SamplingParams
from splitserve.engine.tokenizer import Tokenizer

PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def eos_model(e2e_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A copy of the e2e checkpoint whose EOS is the 6th token it generates for PROMPT.
    Returns (folder, the greedy tokens up to and including that EOS)."""
    tokens = LLM(str(e2e_model), dtype="float32").generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].token_ids
    k = next(i for i in range(4, len(tokens)) if tokens[i] not in tokens[:i])
    out = tmp_path_factory.mktemp("eos-model") / "model"
    shutil.copytree(e2e_model, out)
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": tokens[k]}))
    return out, tokens[: k + 1]


def texts(model: Path, tokens: list[int]) -> tuple[str, str]:
    """(text without the EOS, text with it), as the tokenizer renders them."""
    tok = Tokenizer(model)
    return tok.decode(tokens[:-1], skip_special_tokens=False), tok.decode(tokens, skip_special_tokens=False)


def test_offline(eos_model) -> None:
    model, tokens = eos_model
    plain, shown = texts(model, tokens)
    assert plain != shown and plain
    llm = LLM(str(model), dtype="float32")
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16))[0]
    assert out.token_ids == tokens and out.finish_reason == "stop" and out.text == plain
    kept = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, skip_special_tokens=False))[0]
    assert kept.text == shown


def test_http_and_grpc(eos_model, make_cluster) -> None:
    model, tokens = eos_model
    plain, shown = texts(model, tokens)
    c = make_cluster(model=model).start(("prefill", []), ("decode", []))
    oai = openai.OpenAI(base_url=c.http + "/v1", api_key="unused", timeout=60, max_retries=0)
    name = oai.models.list().data[0].id
    for extra, want in (({}, plain), ({"skip_special_tokens": False}, shown)):
        r = oai.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=0, extra_body=extra)
        assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
        streamed = oai.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=0, stream=True, extra_body=extra)
        assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == want
    with c.client(timeout=60) as sdk:
        assert sdk.generate(PROMPT, max_tokens=16, temperature=0).text == plain
        assert sdk.generate(PROMPT, max_tokens=16, temperature=0, skip_special_tokens=False).text == shown
        assert "".join(ch.text for ch in sdk.generate_stream(PROMPT, max_tokens=16, temperature=0)) == plain
