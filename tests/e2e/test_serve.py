"""`splitserve serve` on a tiny checkpoint, driven as users drive it: the official `openai`
client over HTTP, the gRPC SDK, curl-like raw requests for bad input, /metrics."""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from splitserve.engine import LLM, SamplingParams
from splitserve.engine.tokenizer import Tokenizer
from splitserve.proto.client import AsyncClient, Client, InvalidArgumentError, NotFoundError
from splitserve.router.http_api import render_chat

PROMPTS = ["Hello there", "The quick brown fox jumps over", "def step(self):", "Prefill reads the whole prompt at once and"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is disaggregated serving?"}]


def greedy(llm: LLM, prompt, max_tokens: int = 12):
    return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))[0]


def test_openai_completions_match_the_single_engine(oai: openai.OpenAI, single: LLM) -> None:
    model = oai.models.list().data[0].id
    for prompt in PROMPTS:
        expected = greedy(single, prompt)
        r = oai.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == expected.text
        assert r.usage.completion_tokens == len(expected.token_ids) and r.usage.prompt_tokens == len(single.tokenizer.encode(prompt))
        streamed = oai.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text


def test_openai_chat_matches_the_single_engine(oai: openai.OpenAI, single: LLM, e2e_model: Path) -> None:
    tok = Tokenizer(e2e_model)
    ids = tok.encode(render_chat(tok.config["chat_template"], MESSAGES, bos_token="<s>", eos_token="</s>"), add_special_tokens=False)
    expected = greedy(single, ids)
    model = oai.models.list().data[0].id
    r = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_grpc_sdk_sync_and_async(served, single: LLM) -> None:
    expected = greedy(single, PROMPTS[1])
    with Client(served.grpc) as c:
        done = c.generate(PROMPTS[1], max_tokens=12, temperature=0)
        assert done.text == expected.text and done.token_ids == expected.token_ids
        assert done.usage["completion_tokens"] == 12 and done.timings["ttft"] > 0
        assert "".join(ch.text for ch in c.generate_stream(PROMPTS[1], max_tokens=12, temperature=0)) == expected.text
        t = c.timings(done.request_id)  # the breakdown stays retrievable by request id
        assert t.outcome == "ok" and t.prefill_worker and t.decode_worker and 0 < t.ttft <= t.e2e

    async def run() -> str:
        async with AsyncClient(served.grpc) as ac:
            return (await ac.generate(PROMPTS[1], max_tokens=12, temperature=0)).text

    assert asyncio.run(run()) == expected.text


def test_health_and_reflection(served) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(served.grpc) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "splitserve.v1.Generation", "splitserve.v1.Admin"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert {"splitserve.v1.Generation", "splitserve.v1.Admin", "grpc.health.v1.Health"} <= services


def test_32_concurrent_requests_all_complete_and_match(served, single: LLM) -> None:
    prompts = [[3 + (i * 31 + j * 7) % 480 for j in range(5 + 23 * i)] for i in range(32)]
    expected = [o.token_ids for o in single.generate(prompts, SamplingParams(temperature=0, max_tokens=10))]
    with Client(served.grpc) as c, ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda p: c.generate(p, max_tokens=10, temperature=0).token_ids, prompts))
    assert got == expected


def _post(served, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    u = urllib.parse.urlparse(served.http)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"{}")


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1] * 5000}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": 42}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": [-1], "echo": True}, "prompt"),  # echo decodes the ids: they are checked first (was 500)
    ({"prompt": [[5, 6], [2**32]], "echo": True}, "prompt"),
])
def test_bad_input_is_400_naming_the_field(served, body: dict, field: str) -> None:
    status, err = _post(served, "/v1/completions", json.dumps(body).encode())
    assert status == 400 and err["error"]["param"] == field and field in err["error"]["message"]


def test_an_unknown_model_is_404_naming_it(served) -> None:
    """As OpenAI's API answers (its client raises NotFoundError); over gRPC NOT_FOUND."""
    status, err = _post(served, "/v1/completions", json.dumps({"prompt": "hi", "model": "gpt-17"}).encode())
    assert status == 404 and err["error"]["param"] == "model" and "gpt-17" in err["error"]["message"]
    with Client(served.grpc) as c, pytest.raises(NotFoundError, match="model"):
        c.generate("hello", model="nope")


def test_malformed_json_and_bad_chat_messages(served) -> None:
    status, err = _post(served, "/v1/completions", b"{not json")
    assert status == 400 and "malformed JSON" in err["error"]["message"]
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    status, err = _post(served, "/v1/completions", body, {"Content-Type": "application/x-www-form-urlencoded"})  # what curl -d sends
    assert status == 400 and "Content-Type: application/json" in err["error"]["message"], err
    assert _post(served, "/v1/completions", body, {"Content-Type": "application/json; charset=utf-8"})[0] == 200
    status, err = _post(served, "/v1/chat/completions", json.dumps({"messages": [{"role": "user"}]}).encode())
    assert status == 400 and err["error"]["param"] == "messages[0].content"


def test_bad_input_over_grpc_is_invalid_argument(served) -> None:
    with Client(served.grpc) as c:
        for kwargs, field in [({"max_tokens": 5000}, "max_tokens"), ({"top_p": 2.0}, "top_p")]:
            with pytest.raises(InvalidArgumentError, match=field):
                c.generate("hello", **kwargs)
        with pytest.raises(InvalidArgumentError, match="prompt"):
            c.generate("")


def test_metrics_after_traffic(served) -> None:
    u = urllib.parse.urlparse(served.http)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    for name in ("splitserve:time_to_first_token_seconds_count", "splitserve:inter_token_latency_seconds_count",
                 "splitserve:e2e_request_latency_seconds_count", "splitserve:request_queue_time_seconds_count",
                 "splitserve:kv_transfer_seconds_count", "splitserve:kv_transfer_bytes_total", 'splitserve:requests_total{outcome="ok"}',
                 "splitserve:worker_kv_blocks_used"):
        assert name in text, name
    ok = next(line for line in text.splitlines() if line.startswith('splitserve:requests_total{outcome="ok"}'))
    assert float(ok.split()[-1]) >= 32
    kv = next(line for line in text.splitlines() if line.startswith("splitserve:kv_transfer_bytes_total"))
    assert float(kv.split()[-1]) > 0


def _idle(c: Client, timeout: float = 20.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(w.running == 0 and w.reserved_blocks == 0 for w in c.status().workers):
            return True
        time.sleep(0.2)
    return False


def _cancelled(served) -> float:
    """The router's count of requests whose client left."""
    text = urllib.request.urlopen(served.http + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith('splitserve:requests_total{outcome="cancelled"}'))


def _busy(c: Client, timeout: float = 20.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(w.running > 0 for w in c.status().workers):
            return True
        time.sleep(0.05)
    return False


def test_clients_that_leave_or_abort_free_both_legs(served) -> None:
    import socket
    import threading

    from splitserve.proto.client import AbortedError

    long = dict(max_tokens=3000, temperature=0, ignore_eos=True)
    with Client(served.grpc) as c:
        # 1. a gRPC client that stops reading and goes away
        stream = c.generate_stream("walk away", **long)
        next(stream)
        stream.close()
        assert _idle(c), "the decode leg kept running after the gRPC client left"

        # 2. an HTTP SSE client that drops the connection mid-stream
        u = urllib.parse.urlparse(served.http)
        sock = socket.create_connection((u.hostname, u.port), timeout=30)
        body = json.dumps({"prompt": "hang up", "stream": True, **long}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"data: " not in received:  # headers and the first event may come in separate reads
            chunk = sock.recv(4096)
            assert chunk, "the server closed the stream before the first event"
            received += chunk
        sock.close()
        assert _idle(c), "the decode leg kept running after the HTTP client left"

        # 2b. an HTTP client waiting for a whole answer (n = 4) that gives up: it ran to the end
        #     (minutes here), holding its slots of the router's concurrency cap
        sock = socket.create_connection((u.hostname, u.port), timeout=30)
        body = json.dumps({"prompt": "give up", "n": 4, **long}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert _busy(c), "the request never started"
        before = _cancelled(served)
        sock.close()
        assert _idle(c), "the legs kept running after the HTTP client of a whole answer left"
        assert _cancelled(served) == before + 4  # each choice ended as cancelled, not run to its end

        # 3. an explicit Abort from another client
        errors: list[BaseException] = []

        def victim() -> None:
            try:
                for _ in c.generate_stream("abort me", request_id="abort-me", **long):
                    pass
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=victim)
        t.start()
        with Client(served.grpc) as other:
            for _ in range(100):
                if other.abort("abort-me"):
                    break
                threading.Event().wait(0.05)
        t.join(30)
        assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], AbortedError), errors
        assert _idle(c)
        assert c.timings("abort-me").outcome == "ABORTED"


def test_the_sdk_finds_a_router_that_stopped_answering(served) -> None:
    """The router's process stops (SIGSTOP: its connection stays up). The SDK's keepalive pings
    go unanswered and the call fails UNAVAILABLE instead of waiting out its 120 s deadline; once
    the router resumes, the same client is served again."""
    import os
    import signal

    from splitserve.proto.client import UnavailableError

    with Client(served.grpc, timeout=120) as c:
        assert c.generate("before", max_tokens=2, temperature=0).finish_reason == "length"  # connected
        os.kill(served.popen.pid, signal.SIGSTOP)
        try:
            with pytest.raises(UnavailableError) as e:
                c.generate("while it is stopped", max_tokens=2)
            assert "ping" in str(e.value), str(e.value)
        finally:
            os.kill(served.popen.pid, signal.SIGCONT)
        assert c.generate("after", max_tokens=2, temperature=0).finish_reason == "length"
