"""Decode failover: a decode worker killed mid-stream, and the client's stream continues on
another worker — no token repeated, none missing, the same tokens as an uninterrupted run
(greedy and seeded), through either path of the continuation (a prefill worker, or the new
decode worker prefilling it itself), over gRPC and over HTTP streaming."""

from __future__ import annotations

import json
import os
import random
import signal
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from splitserve.engine import LLM, SamplingParams

MAX_TOKENS = 300
PROMPT = [3 + (i * 29) % 480 for i in range(60)]
SAMPLING = {"greedy": dict(temperature=0), "seeded": dict(temperature=0.9, top_p=0.95, seed=4242)}


@pytest.fixture(scope="module")
def reference(e2e_model: Path) -> dict[str, list[int]]:
    llm = LLM(str(e2e_model), dtype="float32")
    return {name: llm.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **kw))[0].token_ids for name, kw in SAMPLING.items()}


def serving_decode_worker(c):
    decode = [w for w in c.workers.values() if w.ready["role"] == "decode" and w.popen.poll() is None]
    return next((w for w in decode if c.stats(w).running_requests), None)


def decoding(c, sdk, sampling: str):
    """A stream of PROMPT 40 tokens in: (the stream, its tokens, its last chunk, the decode worker serving it)."""
    stream = sdk.generate_stream(PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, **SAMPLING[sampling])
    tokens: list[int] = []
    for chunk in stream:
        tokens += chunk.token_ids
        if len(tokens) >= 40:
            break
    victim = serving_decode_worker(c)
    assert victim is not None
    return stream, tokens, chunk, victim


@pytest.mark.parametrize("path", ["through a prefill worker", "prefilled on the new decode worker"])
@pytest.mark.parametrize("sampling", sorted(SAMPLING))
def test_grpc_stream_continues_on_another_decode_worker(make_cluster, reference, path: str, sampling: str) -> None:
    local = 0 if path == "through a prefill worker" else 100_000
    c = make_cluster(router={"max_retries": 2}, routing={"local_prefill_tokens": local})
    c.start(("prefill", []), ("decode", []), ("decode", []))
    with c.client(timeout=120) as sdk:
        stream, tokens, chunk, victim = decoding(c, sdk, sampling)
        victim.kill()
        rid = chunk.request_id
        for chunk in stream:
            tokens += chunk.token_ids
        assert tokens == reference[sampling], "the continued stream differs from an uninterrupted run"
        assert chunk.finished and chunk.finish_reason == "length"
        t = sdk.timings(rid)
        assert t.outcome == "ok" and t.retries >= 1 and t.decode_worker != victim.worker_id
        assert t.path == ("disaggregated" if local == 0 else "local")
    metrics = urllib.request.urlopen(c.http + "/metrics", timeout=10).read().decode()
    assert 'splitserve:request_retries_total{leg="decode_failover"}' in metrics
    c.assert_idle()


def test_a_hung_decode_worker_is_failed_over(make_cluster, reference) -> None:
    """A decode worker that stops answering (SIGSTOP: its connections stay up) mid-stream: the
    router's keepalive pings go unanswered, the stream fails UNAVAILABLE and continues on the
    other decode worker (it waited for the request's whole deadline). Once the worker resumes,
    nothing of the request is left on it."""
    c = make_cluster(router={"max_retries": 2}, routing={"local_prefill_tokens": 0})
    c.start(("prefill", []), ("decode", []), ("decode", []))
    with c.client(timeout=120) as sdk:
        stream, tokens, chunk, victim = decoding(c, sdk, "greedy")
        os.kill(victim.popen.pid, signal.SIGSTOP)
        try:
            rid = chunk.request_id
            for chunk in stream:
                tokens += chunk.token_ids
            assert tokens == reference["greedy"], "the continued stream differs from an uninterrupted run"
            t = sdk.timings(rid)
            assert t.outcome == "ok" and t.retries >= 1 and t.decode_worker != victim.worker_id
        finally:
            os.kill(victim.popen.pid, signal.SIGCONT)
    c.assert_idle()


def test_http_stream_continues_on_another_decode_worker(make_cluster, reference) -> None:
    import http.client

    c = make_cluster(router={"max_retries": 1}).start(("prefill", []), ("decode", []), ("decode", []))
    u = urllib.parse.urlparse(c.http)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    text, events, killed = [], 0, False
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        assert "error" not in event, event
        text += [ch["text"] for ch in event["choices"]]
        events += 1
        if events == 30 and not killed:
            victim = serving_decode_worker(c)
            victim.kill()
            killed = True
    assert killed
    expected = LLM(str(c.model), dtype="float32").generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0]
    assert "".join(text) == expected.text
    c.assert_idle()


def test_no_failover_when_the_retries_are_spent(make_cluster) -> None:
    from splitserve.proto.client import UnavailableError

    c = make_cluster(router={"max_retries": 0}).start(("prefill", []), ("decode", []), ("decode", []))
    rng = random.Random(3)
    with c.client(timeout=60) as sdk:
        stream = sdk.generate_stream([rng.randrange(3, 500) for _ in range(40)], max_tokens=3000, temperature=0, ignore_eos=True)
        next(stream)
        serving_decode_worker(c).kill()
        with pytest.raises(UnavailableError):
            for _ in stream:
                pass
    c.assert_idle()
