"""The OpenAI API as clients use it, through the official `openai` client against `splitserve
serve`: logprobs in both endpoints' shapes, n > 1, lists of prompts, echo, the penalties,
min_tokens and logit_bias, stream_options, and a 400 naming each field that is not supported.
Every generated token is checked against the single engine with the same parameters."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import httpx
import openai
import pytest

from splitserve.engine import LLM, SamplingParams
from splitserve.engine.tokenizer import Tokenizer
from splitserve.router.http_api import render_chat

PROMPT = "Prefill reads the whole prompt at once and"
MESSAGES = [{"role": "user", "content": "What is disaggregated serving?"}]


@pytest.fixture(scope="module")
def tok(e2e_model: Path) -> Tokenizer:
    return Tokenizer(e2e_model)


@pytest.fixture(scope="module")
def model(oai: openai.OpenAI) -> str:
    return oai.models.list().data[0].id


def ref(single: LLM, prompt, **kw):
    return single.generate([prompt], SamplingParams(**kw))[0]


def text_of(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def test_completion_logprobs(oai: openai.OpenAI, model: str, single: LLM, tok: Tokenizer) -> None:
    expected = ref(single, PROMPT, max_tokens=8, temperature=0, ignore_eos=True, top_logprobs=3)
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [text_of(tok, t) for t in expected.token_ids]
    assert lp.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for chosen, top, alts in zip(lp.tokens, lp.top_logprobs, expected.top_logprobs):
        assert chosen in top and {text_of(tok, t) for t, _ in alts} <= set(top) and len(top) <= 4  # the 3 most likely and the chosen one
    streamed = [c.choices[0].logprobs for c in oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                                                      stream=True, extra_body={"ignore_eos": True}) if c.choices]
    assert [t for c in streamed for t in c.tokens] == lp.tokens
    assert [o for c in streamed for o in c.text_offset] == lp.text_offset


def test_completion_text_offset_skips_special_tokens(oai: openai.OpenAI, model: str, tok: Tokenizer) -> None:
    """A special token left out of the text takes no room in it: `text_offset` points into the
    text returned, whether or not the special tokens are shown."""
    eos = tok._tok.token_to_id(tok.config["eos_token"])
    assert eos in tok.special_ids
    for skip, text in ((True, ""), (False, text_of(tok, eos) * 3)):
        kw = {"model": model, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 1, "logit_bias": {str(eos): 100},
              "extra_body": {"ignore_eos": True, "skip_special_tokens": skip}}
        r = oai.completions.create(**kw)
        lp = r.choices[0].logprobs
        assert r.choices[0].text == text and lp.tokens == [text_of(tok, eos)] * 3
        assert lp.text_offset == ([0, 0, 0] if skip else [0, len(text) // 3, 2 * len(text) // 3])
        streamed = [c.choices[0].logprobs for c in oai.completions.create(**kw, stream=True) if c.choices]
        assert [o for c in streamed for o in c.text_offset] == lp.text_offset


def test_chat_logprobs(oai: openai.OpenAI, model: str, single: LLM, tok: Tokenizer) -> None:
    ids = tok.encode(render_chat(tok.config["chat_template"], MESSAGES, bos_token="<s>", eos_token="</s>"), add_special_tokens=False)
    expected = ref(single, ids, max_tokens=6, temperature=0, top_logprobs=2)
    r = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [text_of(tok, t) for t in expected.token_ids]
    assert [c.logprob for c in content] == pytest.approx(expected.logprobs, abs=1e-4)
    for c, alts in zip(content, expected.top_logprobs):
        assert c.bytes == list(c.token.encode()) or "\ufffd" in c.token  # a part of a character: its own bytes (below)
        assert [a.token for a in c.top_logprobs] == [text_of(tok, t) for t, _ in alts]
        assert [a.logprob for a in c.top_logprobs] == pytest.approx([lp for _, lp in alts], abs=1e-4)
    plain = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_logprob_bytes_of_a_token_that_is_part_of_a_character(oai: openai.OpenAI, model: str, tok: Tokenizer) -> None:
    """A byte-level token holding the first byte of "é" (0xC3) shows U+FFFD as its text; its
    `bytes` are [0xC3], so that joining the tokens' bytes rebuilds the text, as OpenAI's do."""
    half = tok._tok.token_to_id("\u00c3")  # byte-level BPE's character for the byte 0xC3
    assert half is not None and tok.decode([half], skip_special_tokens=False) == "\ufffd"
    r = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1, temperature=0, logprobs=True, logit_bias={str(half): 100})
    (c,) = r.choices[0].logprobs.content
    assert (c.token, c.bytes) == ("\ufffd", [0xC3])
    text = "café — 世界 😀"
    assert b"".join(tok.token_bytes(t) for t in tok.encode(text, add_special_tokens=False)) == text.encode()


def test_n_choices_at_the_top_of_the_seed_range_wrap(oai: openai.OpenAI, model: str, single: LLM) -> None:
    """Any int64 seed is valid with n > 1: choice i's seed + i wraps around int64 (it was refused,
    quoting a seed the client never sent)."""
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=2**63 - 1, n=2)
    expected = [ref(single, PROMPT, max_tokens=6, temperature=1.0, seed=s) for s in (2**63 - 1, -(2**63))]
    assert [c.text for c in r.choices] == [e.text for e in expected]


def test_n_choices_sample_with_seed_plus_i(oai: openai.OpenAI, model: str, single: LLM, served) -> None:
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=5, n=3, user="alice")
    assert [c.index for c in r.choices] == [0, 1, 2]
    expected = [ref(single, PROMPT, max_tokens=10, temperature=1.0, seed=5 + i) for i in range(3)]
    assert [c.text for c in r.choices] == [e.text for e in expected]
    assert len({c.text for c in r.choices}) > 1, "n choices, not n copies of one"
    assert r.usage.prompt_tokens == len(expected[0].prompt_token_ids)  # the prompt once, every choice's output
    assert r.usage.completion_tokens == sum(len(e.token_ids) for e in expected)
    assert isinstance(r.timings, list) and len(r.timings) == 3 and len({t["request_id"] for t in r.timings}) == 3
    for t in r.timings:  # every choice ran to its end: none is recorded as cancelled (they were, once read)
        assert httpx.get(f"{served.http}/v1/requests/{t['request_id']}/timings", timeout=10).json()["outcome"] == "ok"
    by_response = httpx.get(f"{served.http}/v1/requests/{r.id}/timings", timeout=10).json()  # the response's id: every choice's
    assert [t["request_id"] for t in by_response] == [t["request_id"] for t in r.timings]

    texts: dict[int, str] = defaultdict(str)
    usage = None
    for chunk in oai.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=5, n=3, stream=True,
                                        stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert [texts[i] for i in range(3)] == [e.text for e in expected]
    assert usage.completion_tokens == r.usage.completion_tokens and usage.prompt_tokens == r.usage.prompt_tokens
    # unasked, no chunk carries usage (it came once per choice: clients that add chunk usages counted the prompt n times)
    plain = list(oai.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=5, n=3, stream=True))
    assert len(plain) > 3 and all(chunk.usage is None for chunk in plain)


def test_a_list_of_prompts_times_n(oai: openai.OpenAI, model: str, single: LLM) -> None:
    prompts = ["Hello there", "def step(self):"]
    r = oai.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    expected = [ref(single, p, max_tokens=6, temperature=0) for p in prompts]
    assert [c.text for c in r.choices] == [expected[0].text] * 2 + [expected[1].text] * 2  # index = prompt * n + choice
    assert r.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    ids = [single.tokenizer.encode(p) for p in prompts]
    by_ids = oai.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [e.text for e in expected]


def test_echo(oai: openai.OpenAI, model: str, single: LLM) -> None:
    expected = ref(single, PROMPT, max_tokens=6, temperature=0)
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text == PROMPT + expected.text
    streamed = oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == PROMPT + expected.text


def test_penalties_min_tokens_and_logit_bias(oai: openai.OpenAI, model: str, single: LLM) -> None:
    kw = dict(max_tokens=12, temperature=0)
    procs = dict(presence_penalty=0.8, frequency_penalty=0.5, repetition_penalty=1.3, min_tokens=12, logit_bias={7: 5.0, 11: -100.0})
    expected = ref(single, PROMPT, **kw, **procs)
    assert expected.text != ref(single, PROMPT, **kw).text, "the processors change this output"
    r = oai.completions.create(model=model, prompt=PROMPT, **kw, presence_penalty=0.8, frequency_penalty=0.5, logit_bias={"7": 5.0, "11": -100.0},
                               extra_body={"repetition_penalty": 1.3, "min_tokens": 12})
    assert r.choices[0].text == expected.text and r.usage.completion_tokens == 12
    chat = oai.chat.completions.create(model=model, messages=MESSAGES, **kw, presence_penalty=0.8, frequency_penalty=0.5,
                                       logit_bias={"7": 5.0, "11": -100.0}, extra_body={"repetition_penalty": 1.3, "min_tokens": 12})
    assert chat.usage.completion_tokens == 12


@pytest.mark.parametrize("endpoint, kwargs, field", [
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"suffix": "the end"}, "suffix"),
    ("completions", {"echo": True, "logprobs": 1}, "echo"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"n": 0}, "n"),
    ("completions", {"n": 65}, "n"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),  # without stream, as OpenAI's
    ("completions", {"logit_bias": {"x7": 1.0}}, "logit_bias"),
    ("completions", {"logit_bias": {"7": 101.0}}, "logit_bias"),
    ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format.type"),  # {"type": "text"} is accepted
])
def test_unsupported_or_bad_fields_are_400_naming_them(oai: openai.OpenAI, model: str, endpoint: str, kwargs: dict, field: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, **kwargs)
        else:
            oai.completions.create(model=model, prompt=PROMPT, max_tokens=2, **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == field and field in e.value.body["message"]
    # the client's pooled connection carries its next request (Starlette's handler of Exception
    # used to have uvicorn close it after a 400, and the next request was reset)
    ok = oai.completions.create(model=model, prompt=PROMPT, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_a_stop_string_across_tokens_never_reaches_the_client(oai: openai.OpenAI, model: str, single: LLM, tok: Tokenizer) -> None:
    """A stop string whose first character ends one token and whose rest begins the next: the
    first token's text must be held back until the next shows it is the stop (it leaked)."""
    full = ref(single, PROMPT, temperature=0, max_tokens=16, ignore_eos=True)
    text = full.text
    bounds = [len(tok.decode(full.token_ids[:i])) for i in range(1, len(full.token_ids))]
    b = next(b for b in bounds if 1 <= b < len(text) - 1 and text.find(text[b - 1 : b + 2]) == b - 1)
    stop, want = text[b - 1 : b + 2], text[: b - 1]
    assert ref(single, PROMPT, temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]).text == want  # the engine cuts there
    kw = dict(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    r = oai.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    assert "".join(ch.choices[0].text for ch in oai.completions.create(**kw, stream=True) if ch.choices) == want
    # a prefix of a stop string that turns out not to be one is sent after all
    near = text[b - 1] + "\x00never"
    r = oai.completions.create(**{**kw, "stop": [near]})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "length")
    assert "".join(ch.choices[0].text for ch in oai.completions.create(**{**kw, "stop": [near]}, stream=True) if ch.choices) == text


def test_chat_without_max_tokens_runs_until_the_model_stops(oai: openai.OpenAI, model: str, single: LLM, tok: Tokenizer) -> None:
    """As OpenAI's chat (and vLLM's): no max_tokens means no cap short of the context, not the
    legacy completions default of 16 (clients that never send it got 16 tokens)."""
    ids = tok.encode(render_chat(tok.config["chat_template"], MESSAGES, bos_token="<s>", eos_token="</s>"), add_special_tokens=False)
    full = ref(single, ids, max_tokens=40, temperature=0, ignore_eos=True)
    stop = next(full.text[i : i + 3] for i in range(len(full.text) - 30, len(full.text) - 3) if full.text.find(full.text[i : i + 3]) == i)
    want = ref(single, ids, max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    r = oai.chat.completions.create(model=model, messages=MESSAGES, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want.text, "stop")
    assert r.usage.completion_tokens == len(want.token_ids) > 16


def test_kv_caches_smaller_than_the_context_bound_requests_where_they_must(make_cluster, tok: Tokenizer) -> None:
    """Decode workers whose KV caches hold fewer tokens than the model's context (640 and 3,200
    of 4,096), and a prefill worker holding 1,280: chat without max_tokens runs until the smaller
    decode cache is full instead of being refused for a length the client never asked for; a
    request only the larger decode worker holds goes there (it could land on the smaller one and
    come back 400 naming an internal address), and its prompt need not leave room for the output
    on the prefill worker (which holds no output); one no worker holds is refused naming the field."""
    c = make_cluster(routing={"local_prefill_tokens": 0})
    c.start(("prefill", ["--num-kv-blocks", "80"]), ("decode", ["--num-kv-blocks", "40"]), ("decode", ["--num-kv-blocks", "200"]))
    with c.client() as sdk:
        (large,) = [w.worker_id for w in sdk.status().workers if w.role == "decode" and w.total_blocks == 200]
    client = openai.OpenAI(base_url=c.http + "/v1", api_key="unused", timeout=120, max_retries=0)
    card = client.models.list().data[0]
    model = card.id
    assert card.max_model_len == 640  # vLLM's field: what any decode worker can take
    ids = tok.encode(render_chat(tok.config["chat_template"], MESSAGES, bos_token="<s>", eos_token="</s>"), add_special_tokens=False)
    r = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True})
    assert (r.choices[0].finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens) == ("length", len(ids), 40 * 16 - len(ids))
    for _ in range(3):  # 700 tokens: more than the smaller decode cache holds (640) with any prompt
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=700, temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 700 and r.timings["decode_worker"] == large
    for kwargs, field in [({"prompt": PROMPT, "max_tokens": 3500}, "max_tokens"), ({"prompt": [5] * 3300, "max_tokens": 1}, "prompt")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, **kwargs)
        assert e.value.body["param"] == field and "largest decode worker (3200 tokens)" in e.value.body["message"], e.value.body
    c.assert_idle()


def test_fields_clients_send_with_their_defaults_are_accepted(oai: openai.OpenAI, model: str, served) -> None:
    """Plain text, no tool calls, nothing stored, the client's metadata, a tool message's id and
    vLLM's chat_template_kwargs ask for nothing this server does not do: answered like the plain
    request. What they would ask beyond that stays refused by name."""
    plain = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0).choices[0].message.content
    extra = dict(response_format={"type": "text"}, tool_choice="none", parallel_tool_calls=False, store=False, metadata={"team": "a"},
                 extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    r = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0, **extra)
    assert r.choices[0].message.content == plain
    turns = [*MESSAGES, {"role": "assistant", "content": "Splitting prefill from decode."}, {"role": "tool", "content": "42", "tool_call_id": "call_1"}]
    assert oai.chat.completions.create(model=model, messages=turns, max_tokens=3, temperature=0).choices[0].finish_reason == "length"
    for kwargs, field in [({"tool_choice": "auto"}, "tool_choice"), ({"store": True}, "store"),
                          ({"extra_body": {"chat_template_kwargs": {"messages": []}}}, "chat_template_kwargs")]:
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, **kwargs)
        assert e.value.body["param"] == field, e.value.body


def test_routes_as_http_clients_expect(oai: openai.OpenAI, model: str, served) -> None:
    """The model's own card (the client's models.retrieve), 405 with Allow, and no redirect of a
    trailing slash (it sent a 307 to whatever host the Host header named)."""
    assert oai.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("no-such-model")
    assert e.value.body["param"] == "model"
    r = httpx.get(f"{served.http}/v1/completions", timeout=10)
    assert (r.status_code, r.headers.get("allow")) == (405, "POST")
    r = httpx.post(f"{served.http}/v1/completions/", json={"prompt": "hi"}, headers={"Host": "evil.example"}, timeout=10)
    assert r.status_code == 404 and "location" not in r.headers and r.json()["error"]["type"]
