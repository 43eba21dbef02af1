"""router/http_api.py's error answers, without a server: what a chat template cannot render,
bodies that are not JSON, and fields named as the client sent them."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.exceptions import RequestValidationError

from splitserve.engine.errors import ContextLengthExceededError, InvalidRequestError
from splitserve.router.http_api import _renamed, _unparsable, render_chat, validation_error

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template", [
    "{{ messages[0].content + 1 }}",  # TypeError on the request's content
    "{{ messages[5].content.upper() }}",  # UndefinedError: fewer messages than the template wants
    "{% for m in messages %}{{ range(m.content) }}{% endfor %}",  # a call that fails on them
    "{{ messages.append(1) }}",  # the sandbox refuses
])
def test_a_template_that_fails_on_the_messages_is_their_fault(template: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        render_chat(template, MESSAGES)
    assert e.value.field == "messages" and "cannot render" in str(e.value)


def test_the_templates_own_refusal_passes_through() -> None:
    with pytest.raises(InvalidRequestError, match="messages: roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", MESSAGES)


def test_undecodable_bodies_say_why() -> None:
    try:
        json.loads("[" * 100_000 + "]" * 100_000)
    except RecursionError as e:
        assert _unparsable(e) == "malformed JSON body: nested too deeply"
    assert "not valid UTF-8" in _unparsable(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    try:
        json.loads("9" * 5000)
    except ValueError as e:
        assert _unparsable(e) == "malformed JSON body: an integer has too many digits"


def test_an_unknown_field_named_by_the_empty_string_is_still_named() -> None:
    err = RequestValidationError([{"type": "extra_forbidden", "loc": ("body", ""), "msg": "Extra inputs are not permitted"}])
    body = json.loads(validation_error(err).body)["error"]
    assert body["param"] == "" and "is not a field" in body["message"]
    whole = RequestValidationError([{"type": "dict_type", "loc": ("body",), "msg": "Input should be a valid dictionary"}])
    assert json.loads(validation_error(whole).body)["error"]["param"] is None


def test_engine_fields_are_renamed_to_the_chat_requests() -> None:
    with pytest.raises(ContextLengthExceededError) as e, _renamed({"prompt": "messages"}):
        raise ContextLengthExceededError("prompt", "has 5000 tokens; the model's context is 4096")
    assert e.value.field == "messages" and str(e.value) == "messages: has 5000 tokens; the model's context is 4096"
    with pytest.raises(InvalidRequestError) as e, _renamed({"prompt": "messages"}):
        raise InvalidRequestError("seed", "must be an integer")
    assert e.value.field == "seed"


# ---- the choices of one request (n > 1), merged ---------------------------------------------
class Choice:
    """A choice's stream: `plan` is what it does, one step per chunk ("tok", "end", an
    exception to raise, or "hang" to wait until cancelled); records whether it was closed."""

    def __init__(self, rid: str, *plan) -> None:
        self.rid, self.plan, self.closed = rid, plan, False

    async def stream(self):
        from splitserve.router.orchestrator import Chunk

        try:
            for step in self.plan:
                await asyncio.sleep(0.01)
                if step == "hang":
                    await asyncio.Event().wait()
                if isinstance(step, BaseException):
                    raise step
                yield Chunk(self.rid, [1], [0.0], "x", finished=step == "end")
        finally:
            self.closed = True


def merge(*choices: Choice):
    from splitserve.router.http_api import _merged

    discarded: list[str] = []
    streams = [c.stream() for c in choices]
    return _merged(streams, [c.rid for c in choices], discarded.append), discarded


def test_merged_choices_interleave_and_close_when_all_finished() -> None:
    a, b = Choice("a", "tok", "tok", "end"), Choice("b", "end")

    async def run():
        merged, discarded = merge(a, b)
        got = [(k, c.finished) async for k, c in merged]
        return got, discarded

    got, discarded = asyncio.run(run())
    assert sorted(got) == [(0, False), (0, False), (0, True), (1, True)] and got[:2] == [(0, False), (1, True)]  # first chunks first, in order
    assert a.closed and b.closed and discarded == ["a", "b"]


@pytest.mark.parametrize("when", ["before the first token", "after it"])
def test_one_failing_choice_fails_the_request_and_closes_the_others(when: str) -> None:
    from splitserve.proto.status import StatusError

    boom = StatusError("UNAVAILABLE", "decode worker lost")
    failing = Choice("a", boom) if when == "before the first token" else Choice("a", "tok", boom)
    other = Choice("b", "tok", "hang")

    async def run():
        merged, _ = merge(failing, other)
        seen = []
        with pytest.raises(StatusError) as e:
            async for k, _c in merged:
                seen.append(k)
        return seen, e.value

    seen, err = asyncio.run(run())
    assert err is boom and other.closed and failing.closed
    assert seen == ([] if when == "before the first token" else [0, 1])  # before: nothing reached the client


def _app(cors: list[str], keys: frozenset[str] = frozenset({"k1"}), limits=None, raise_server_exceptions: bool = True, **frontend):
    """The router's HTTP front door (body limits, CORS, the app) over a stand-in frontend."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from splitserve.router.http_api import build_app
    from splitserve.router.http_limits import HTTPLimits, front_door

    orch = SimpleNamespace(model_name="tiny", context_limit=lambda: 2048)
    app = build_app(SimpleNamespace(orch=orch, started=0, **frontend), keys)
    return TestClient(front_door(app, limits or HTTPLimits(), cors), raise_server_exceptions=raise_server_exceptions)


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_lets_the_listed_origins_call_with_their_key() -> None:
    client = _app(["https://app.example.com"])
    ok = client.options("/v1/chat/completions", headers={"Origin": "https://app.example.com", **PREFLIGHT})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example.com"
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in ok.headers["access-control-allow-headers"].split(",")}
    r = client.get("/v1/models", headers={"Origin": "https://app.example.com", "Authorization": "Bearer k1"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    # the key is still checked, and the refusal is readable by the page
    denied = client.get("/v1/models", headers={"Origin": "https://app.example.com"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://app.example.com"
    other = client.options("/v1/chat/completions", headers={"Origin": "https://evil.example.com", **PREFLIGHT})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_cors_headers_on_the_answers_outside_the_app() -> None:
    """The body limits' 413 and an unexpected error's 500 are answered outside FastAPI's own
    middleware: with CORS added there, a browser page saw them as network errors."""
    from splitserve.router.http_limits import HTTPLimits

    origin = {"Origin": "https://app.example.com"}
    client = _app(["https://app.example.com"], frozenset(), limits=HTTPLimits(max_request_bytes=64))
    big = client.post("/v1/completions", content=b"x" * 100, headers={**origin, "Content-Type": "application/json"})
    assert big.status_code == 413 and big.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "100 bytes" in big.json()["error"]["message"]

    async def plan(body):
        raise RuntimeError("boom")

    broken = _app(["https://app.example.com"], frozenset(), raise_server_exceptions=False, completion_plan=plan, respond=None)
    r = broken.post("/v1/completions", json={"prompt": "hi"}, headers=origin)
    assert r.status_code == 500 and r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert r.json()["error"]["message"] == "boom"


def test_without_cors_origins_no_cross_origin_headers() -> None:
    client = _app([])
    r = client.get("/v1/models", headers={"Origin": "https://app.example.com", "Authorization": "Bearer k1"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert client.options("/v1/chat/completions", headers={"Origin": "https://app.example.com", **PREFLIGHT}).status_code == 405
    assert _app(["*"]).get("/v1/models", headers={"Origin": "https://x.example", "Authorization": "Bearer k1"}).headers["access-control-allow-origin"] == "*"


def test_no_worker_ready_is_a_503_that_keeps_the_connection(caplog) -> None:
    """It took the unexpected-error path: a logged traceback and `Connection: close`, which
    reset pooled clients' next request."""
    from splitserve.router.policy import NoWorkerError

    async def plan(body):
        raise NoWorkerError("no decode worker is ready")

    r = _app([], frozenset(), completion_plan=plan, respond=None).post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.headers["retry-after"] and "connection" not in r.headers
    assert r.json()["error"]["message"] == "no decode worker is ready"
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]
