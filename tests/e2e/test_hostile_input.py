"""Hostile input at both front doors of one router, and the limits that bound what a client can
hold. The fuzz is seeded (tests/e2e/hostile.py makes the cases): over 2,000 malformed HTTP
requests and over 300 malformed gRPC calls, sent concurrently while the server is watched.
Correct means: no HTTP 5xx; every 4xx in the OpenAI error shape, naming the field where a field
is to blame; no gRPC INTERNAL or UNKNOWN; /health and real completions served throughout; no
worker left holding reserved blocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
import urllib.parse
from collections import Counter, defaultdict

import grpc
import grpc.aio
import pytest

from splitserve.proto import public_pb2_grpc
from splitserve.proto.client import AsyncClient, UnavailableError, _request
from tests.e2e import hostile
from tests.e2e.hostile import Answer, GRPCCase, HTTPCase
from tests.e2e.local_cluster import InThread, post, wait_until

logger = logging.getLogger(__name__)
SEED = 20261202
LIMITS = {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "send_timeout_s": 5.0, "max_request_bytes": 1 << 20, "max_header_bytes": 16 << 10}
# what each category's cases must be answered with, when not by any 2xx/4xx
EXPECTED = {"Content-Length larger than the body": {408}, "body never completes": {408}, "headers never complete": {408},
            "body too large": {413}, "oversized headers": {431}}
BODY = json.dumps(hostile.COMPLETION).encode()


def make_http_cases(rng: random.Random) -> list[HTTPCase]:
    return [*hostile.field_cases(rng), *hostile.body_cases(rng), *hostile.content_type_cases(), *hostile.route_cases(rng),
            *hostile.protocol_cases(rng, LIMITS["max_header_bytes"]),
            *hostile.slow_cases(rng, LIMITS["body_timeout_s"], LIMITS["header_timeout_s"], LIMITS["max_request_bytes"])]


def make_grpc_cases(rng: random.Random) -> list[GRPCCase]:
    return [*hostile.sdk_cases(), *hostile.garbage_cases(rng, per_method=28)]


def same(data: bytes) -> bytes:
    """The serializer of raw calls: the bytes go out as they are, and come back as they are."""
    return data


def http_problem(case: HTTPCase, a: Answer) -> str | None:
    """What is wrong with the answer to a case; None when it is right."""
    if a.status is None:
        return "no answer: the connection closed or the client waited out its deadline"
    if a.status >= 500:
        return f"{a.status}: {a.body[:300]!r}"
    expected = EXPECTED.get(case.category)
    if expected is not None and a.status not in expected:
        return f"{a.status}, expected one of {sorted(expected)}: {a.body[:300]!r}"
    if a.status < 400 or case.head:
        return None
    try:
        err = json.loads(a.body)["error"]
        shaped = set(err) == {"message", "type", "param", "code"} and err["message"] and isinstance(err["type"], str) and err["code"] == a.status
    except (ValueError, KeyError, TypeError):
        shaped = False
    if not shaped:
        return f"{a.status} without the OpenAI error shape: {a.body[:300]!r}"
    if a.status in (429, 503) and "retry-after" not in a.headers:
        return f"{a.status} without Retry-After"
    param = err["param"]
    if a.status == 400 and case.field is not None and not (param == case.field or str(param).startswith((f"{case.field}[", f"{case.field}."))):
        return f"400 names {param!r}, not {case.field!r}: {err['message'][:200]}"
    return None


def grpc_problem(case: GRPCCase, code: grpc.StatusCode, details: str) -> str | None:
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return f"{code.name}: {details[:300]}"
    if case.category == "garbage bytes" and (code != grpc.StatusCode.INVALID_ARGUMENT or case.field not in details):
        return f"{code.name}, expected INVALID_ARGUMENT naming {case.field}: {details[:300]}"
    if case.category == "bad parameters (SDK)" and code not in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        return f"{code.name}, expected OK, INVALID_ARGUMENT or NOT_FOUND: {details[:300]}"
    if code == grpc.StatusCode.INVALID_ARGUMENT and case.field is not None and case.field not in details:
        return f"INVALID_ARGUMENT not naming {case.field}: {details[:300]}"
    return None


async def call_grpc(channel: grpc.aio.Channel, case: GRPCCase) -> tuple[grpc.StatusCode, str]:
    try:
        if case.server_streaming:
            async for _ in channel.unary_stream(case.method, request_serializer=same, response_deserializer=same)(case.payload, timeout=60):
                pass
        else:
            await channel.unary_unary(case.method, request_serializer=same, response_deserializer=same)(case.payload, timeout=60)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


class Watch:
    """Asks the router for /health and for a real completion (HTTP and gRPC) all along."""

    def __init__(self, host: str, port: int, grpc_address: str) -> None:
        self.host, self.port, self.grpc_address = host, port, grpc_address
        self.failures: list[str] = []
        self.checks = Counter()

    async def run(self, stop: asyncio.Event) -> None:
        async with AsyncClient(self.grpc_address, timeout=60) as sdk:
            while not stop.is_set():
                health = await hostile.send(self.host, self.port, HTTPCase("watch", hostile.request("GET", "/health", content_type=None)))
                self._check("health", health.status == 200, health)
                done = await hostile.send(self.host, self.port, HTTPCase("watch", hostile.request("POST", "/v1/completions", BODY), deadline=60))
                self._check("completion", done.status == 200 and json.loads(done.body)["choices"][0]["finish_reason"], done)
                try:
                    self._check("grpc completion", (await sdk.generate("still there?", max_tokens=2, temperature=0)).finish_reason == "length", None)
                except Exception as e:  # noqa: BLE001 - a failure here is the finding
                    self._check("grpc completion", False, repr(e))
                await asyncio.sleep(0.2)

    def _check(self, what: str, ok: bool, got: object) -> None:
        self.checks[what] += 1
        if not ok:
            self.failures.append(f"{what}: {got}")


async def fuzz(host: str, port: int, grpc_address: str, http_cases: list[HTTPCase], grpc_cases: list[GRPCCase]) -> tuple[dict, dict, Watch]:
    http_seen: dict[str, list] = defaultdict(list)  # category -> [(status, problem or None, bytes sent)]
    grpc_seen: dict[str, list] = defaultdict(list)
    gate = asyncio.Semaphore(16)
    stop = asyncio.Event()
    watch = Watch(host, port, grpc_address)

    async def one_http(case: HTTPCase) -> None:
        slow = case.category in EXPECTED and case.category not in ("body too large", "oversized headers")
        async with gate if not slow else contextlib.nullcontext():  # the slow ones wait out deadlines: all at once
            try:
                answer = await hostile.send(host, port, case)
            except (asyncio.TimeoutError, OSError) as e:
                answer = Answer(None, {}, repr(e).encode(), case.deadline)
        http_seen[case.category].append((answer.status, http_problem(case, answer), case.data[:160]))

    async def one_grpc(channel: grpc.aio.Channel, case: GRPCCase) -> None:
        async with gate:
            code, details = await call_grpc(channel, case)
        grpc_seen[case.category].append((code.name, grpc_problem(case, code, details), case.method))
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT):
            logger.info("%s %s (%s): %s %s", case.category, case.method, case.field, code.name, details[:200])

    watcher = asyncio.ensure_future(watch.run(stop))
    async with grpc.aio.insecure_channel(grpc_address) as channel:
        await asyncio.gather(*(one_http(c) for c in http_cases), *(one_grpc(channel, c) for c in grpc_cases))
        code, details = await reflection_garbage(channel)
        grpc_seen["garbage bytes"].append((code.name, grpc_problem(GRPCCase("garbage bytes", "", b"", True, "ServerReflectionRequest"), code, details),
                                           "reflection stream"))
    stop.set()
    await watcher
    return http_seen, grpc_seen, watch


async def reflection_garbage(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, str]:
    call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", request_serializer=same, response_deserializer=same)
    try:
        async for _ in call(iter([b"\x0a\x03\xff\xfe\xfd"]), timeout=30):
            pass
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _summary(seen: dict) -> str:
    return "; ".join(f"{cat}: {len(rows)} ({', '.join(f'{s}x{n}' for s, n in sorted(Counter(str(r[0]) for r in rows).items()))})" for cat, rows in seen.items())


def test_hostile_input_at_both_doors(make_cluster) -> None:
    c = make_cluster(router=LIMITS).start(("prefill", []), ("decode", ["--num-kv-blocks", "512"]))
    rng = random.Random(SEED)
    http_cases, grpc_cases = make_http_cases(rng), make_grpc_cases(rng)
    assert len(http_cases) >= 2000 and len(grpc_cases) >= 300, (len(http_cases), len(grpc_cases))
    u = urllib.parse.urlparse(c.http)
    start = time.monotonic()
    http_seen, grpc_seen, watch = asyncio.run(fuzz(u.hostname, u.port, c.grpc, http_cases, grpc_cases))
    logger.info("hostile input: %d HTTP requests, %d gRPC calls in %.1f s", len(http_cases), len(grpc_cases) + 1, time.monotonic() - start)
    logger.info("HTTP by category and status: %s", _summary(http_seen))
    logger.info("gRPC by kind and code: %s", _summary(grpc_seen))
    logger.info("watched throughout: %s", dict(watch.checks))
    problems = [f"{cat}: {problem} <- {sent!r}" for cat, rows in http_seen.items() for _, problem, sent in rows if problem]
    problems += [f"gRPC {cat} {method}: {problem}" for cat, rows in grpc_seen.items() for _, problem, method in rows if problem]
    assert not problems, f"{len(problems)} wrong answers, e.g.:\n" + "\n".join(problems[:25])
    assert not watch.failures and min(watch.checks.values()) >= 3, (watch.failures[:10], watch.checks)
    status, body, _ = post(c.http, {"prompt": "after the storm", "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    with c.client(timeout=60) as sdk:
        assert sdk.generate("after the storm", max_tokens=4, temperature=0).finish_reason == "length"
    c.assert_idle()


# ---- the limits, one by one ----------------------------------------------------------------
CAPPED = {"max_concurrent_requests": 2, "max_request_bytes": 64 << 10, "max_header_bytes": 4 << 10, "header_timeout_s": 1.0, "body_timeout_s": 1.0}


def _running(c) -> float:
    """Requests in flight on the router, from its /metrics."""
    text = _send(c, HTTPCase("", hostile.request("GET", "/metrics", content_type=None))).body.decode()
    return float(next(line for line in text.splitlines() if line.startswith("splitserve:num_requests_running")).split()[-1])


def _send(c, case: HTTPCase) -> Answer:
    u = urllib.parse.urlparse(c.http)
    return asyncio.run(hostile.send(u.hostname, u.port, case))


def _error(a: Answer, status: int) -> dict:
    assert a.status == status, (a.status, a.body[:300])
    err = json.loads(a.body)["error"]
    assert err["code"] == status and err["param"] is None and err["message"], err
    return err


def test_limits_answer_with_their_status_at_once(make_cluster) -> None:
    c = make_cluster(router={**CAPPED, "send_timeout_s": 1.0}).start(("prefill", []), ("decode", []))
    # the body: a declared size over the limit is refused before it is read, a sent one as it arrives
    assert "at most 65536" in _error(_send(c, HTTPCase("", hostile.request("POST", "/v1/completions", length=65537))), 413)["message"]
    big = b'{"prompt": "' + b"a" * (64 << 10) + b'"}'
    chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    _error(_send(c, HTTPCase("", chunked + b"%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n")), 413)
    assert _send(c, HTTPCase("", hostile.request("POST", "/v1/completions", json.dumps({"prompt": "a" * 60_000}).encode()))).status == 400  # too long, not too big
    # the headers
    _error(_send(c, HTTPCase("", hostile.request("GET", "/health", content_type=None, extra=b"X-Big: " + b"a" * (4 << 10) + b"\r\n"))), 431)
    assert _send(c, HTTPCase("", hostile.request("GET", "/health", content_type=None, extra=b"X-Ok: " + b"a" * 3000 + b"\r\n"))).status == 200
    # a body or headers that stop coming: 408 after the deadline, not later
    for case in [HTTPCase("", hostile.request("POST", "/v1/completions", BODY, length=len(BODY) + 1)),
                 HTTPCase("", chunked + b"5\r\n{\"pro\r\n"),
                 HTTPCase("", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")]:
        a = _send(c, case)
        assert "did not arrive within 1 s" in _error(a, 408)["message"] and 0.9 < a.seconds < 3, a.seconds
    # an idle connection is closed without an answer
    u = urllib.parse.urlparse(c.http)
    idle = socket.create_connection((u.hostname, u.port), timeout=10)
    begun = time.monotonic()
    assert idle.recv(100) == b"" and time.monotonic() - begun < 3
    idle.close()
    # a gRPC caller that stops reading: once a write has waited 1 s its request is aborted (its
    # slot and both legs freed); the call ends DEADLINE_EXCEEDED when it reads again
    with grpc.insecure_channel(c.grpc, options=[("grpc.http2.bdp_probe", 0)]) as channel:  # the stream window stays small
        stalled = public_pb2_grpc.GenerationStub(channel).Generate(_request("stop reading", max_tokens=4000, temperature=0, ignore_eos=True), timeout=120)
        next(stalled)
        wait_until(lambda: _running(c) == 0, 60, "the stalled caller's request aborted")
        c.assert_idle()
        with pytest.raises(grpc.RpcError) as e:
            list(stalled)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "read nothing for 1 s" in e.value.details()
    c.assert_idle()


def test_beyond_the_concurrency_cap_both_doors_answer_unavailable_with_retry_after(make_cluster) -> None:
    c = make_cluster(router=CAPPED).start(("prefill", []), ("decode", []))
    (d,) = [w for w in c.workers.values() if w.ready["role"] == "decode"]
    long = {"max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    with c.client(timeout=60) as sdk:
        held = sdk.generate_stream("hold one", **long)
        next(held)
        u = urllib.parse.urlparse(c.http)
        sse = socket.create_connection((u.hostname, u.port), timeout=30)
        body = json.dumps({"prompt": "hold two", "stream": True, **long}).encode()
        sse.sendall(hostile.request("POST", "/v1/completions", body))
        received = b""
        while b"data: " not in received:  # the headers and the first event may come apart
            chunk = sse.recv(65536)
            assert chunk, "the server closed the stream before the first event"
            received += chunk
        wait_until(lambda: c.stats(d).running_requests == 2, 30, "both held requests decoding")

        status, err, headers = post(c.http, {"prompt": "a third", "max_tokens": 2})
        assert status == 503 and headers.get("retry-after") == "1", (status, err, headers)
        assert err["error"]["type"] == "unavailable" and "limit of 2 concurrent requests" in err["error"]["message"]
        with pytest.raises(UnavailableError, match="limit of 2 concurrent requests"):
            sdk.generate("a third", max_tokens=2)
        call = sdk.stub.Generate(_request("a third", max_tokens=2), timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and ("retry-after", "1") in (e.value.trailing_metadata() or ())
        # /health is not a request to the orchestrator: it still answers
        assert _send(c, HTTPCase("", hostile.request("GET", "/health", content_type=None))).status == 200

        held.close()
        sse.close()
        wait_until(lambda: c.stats(d).running_requests == 0, 30, "the held requests aborted")
        # more choices than the cap can ever admit: a 400 naming n, not a 'retry shortly' that never succeeds
        status, err, _ = post(c.http, {"prompt": "too many", "max_tokens": 2, "n": 3})
        assert status == 400 and err["error"]["param"] == "n" and "at most 2 requests at once" in err["error"]["message"], err
        later = InThread(lambda: post(c.http, {"prompt": "room again", "max_tokens": 2}))
        assert sdk.generate("room again", max_tokens=2).finish_reason == "length"
        assert later.result()[0] == 200
    c.assert_idle()
