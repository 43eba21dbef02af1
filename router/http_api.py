"""OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (SSE streaming or not),
/v1/models, /health, /metrics, and /v1/requests/{id}/timings (where a request's time went).

Request bodies are checked field by field: a wrong type or value is a 400 whose message and
`param` name the field. Errors use the OpenAI error shape, with statuses from proto.status.
A client that disconnects mid-stream aborts its request's two legs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jinja2
import jinja2.sandbox

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.proto.status import STATUSES, http_status, status_of
from splitserve.router.orchestrator import Chunk, GenerateInput, Orchestrator

logger = logging.getLogger(__name__)
MAX_BODY = 64 << 20
RETRY_AFTER_SECONDS = 1  # sent with 429 / 503: the condition is a worker's, and passes


class HTTPError(Exception):
    def __init__(self, status: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def render_chat(template: str, messages: list[dict], **special: Any) -> str:
    """Render a checkpoint's chat template (tokenizer_config.json) for a new assistant turn."""

    def raise_exception(message: str) -> None:
        raise InvalidRequestError("messages", message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)


# ---- request parsing ---------------------------------------------------------------------
def _field(body: dict, key: str, kinds: tuple[type, ...], default: Any = None, what: str = "") -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise InvalidRequestError(key, f"must be {what or ' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    return value


def sampling_from_body(body: dict, max_tokens_keys: tuple[str, ...] = ("max_tokens",)) -> SamplingParams:
    max_tokens = 16
    for key in max_tokens_keys:
        v = _field(body, key, (int,), None, "an integer")
        if v is not None:
            max_tokens = v
            break
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise InvalidRequestError("stop", f"must be a string or a list of strings, got {type(stop).__name__}")
    n = _field(body, "n", (int,), 1)
    if n != 1:
        raise InvalidRequestError("n", f"only n=1 is supported, got {n}")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(_field(body, "temperature", (int, float), 1.0, "a number")),
        top_p=float(_field(body, "top_p", (int, float), 1.0, "a number")),
        top_k=_field(body, "top_k", (int,), 0) if body.get("top_k", 0) != -1 else 0,
        seed=_field(body, "seed", (int,), None),
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        stop_token_ids=tuple(_field(body, "stop_token_ids", (list,), [])),
        ignore_eos=bool(_field(body, "ignore_eos", (bool,), False)),
        skip_special_tokens=bool(_field(body, "skip_special_tokens", (bool,), True)),
    )


class OpenAIFrontend:
    """Turns OpenAI request bodies into orchestrator calls and chunks into OpenAI responses."""

    def __init__(self, orchestrator: Orchestrator, chat_template: str | None, special_tokens: dict[str, str]) -> None:
        self.orch = orchestrator
        self.chat_template = chat_template
        self.special = special_tokens

    def completion_input(self, body: dict) -> GenerateInput:
        if "prompt" not in body:
            raise InvalidRequestError("prompt", "is required")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt))):
            raise InvalidRequestError("prompt", "must be a string or a list of token ids (one prompt per request)")
        return GenerateInput(prompt, sampling_from_body(body), model=_field(body, "model", (str,), ""))

    def chat_input(self, body: dict) -> GenerateInput:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages", "must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{i}]", "must be an object with string 'role' and 'content'")
        if not self.chat_template:
            raise InvalidRequestError("messages", "this model has no chat template (tokenizer_config.json has none); use /v1/completions")
        text = render_chat(self.chat_template, messages, **self.special)
        ids = self.orch.tokenizer.encode(text, add_special_tokens=False)
        params = sampling_from_body(body, ("max_completion_tokens", "max_tokens"))
        return GenerateInput(ids, params, model=_field(body, "model", (str,), ""))

    # ---- responses -------------------------------------------------------------------------
    def respond(self, kind: str, inp: GenerateInput, stream: bool, include_usage: bool) -> tuple[str, Iterator[dict] | dict]:
        chunks = self.orch.generate(inp)  # validation errors raise here, before any byte is sent
        created = int(time.time())
        if stream:
            return "stream", self._stream(kind, chunks, created, include_usage)
        return "json", self._collect(kind, chunks, created)

    def _collect(self, kind: str, chunks: Iterator[Chunk], created: int) -> dict:
        text, last = [], None
        for c in chunks:
            text.append(c.text)
            last = c
        body = "".join(text)
        choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": body}
        else:
            choice["text"] = body
        return {
            "id": last.request_id, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
            "model": self.orch.model_name, "choices": [choice], "usage": _usage(last.usage), "timings": last.timings.to_dict(),
        }

    def _stream(self, kind: str, chunks: Iterator[Chunk], created: int, include_usage: bool) -> Iterator[dict]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        first = True
        for c in chunks:
            if kind == "chat":
                delta: dict = {"content": c.text}
                if first:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "finish_reason": c.finish_reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
            first = False
            event = {"id": c.request_id, "object": obj, "created": created, "model": self.orch.model_name, "choices": [choice]}
            if c.finished and not include_usage:
                event["usage"] = _usage(c.usage)
            yield event
            if c.finished and include_usage:
                yield {"id": c.request_id, "object": obj, "created": created, "model": self.orch.model_name, "choices": [], "usage": _usage(c.usage)}


def _usage(u: dict | None) -> dict:
    u = u or {}
    p, c = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "prompt_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)}}


class _Handler(BaseHTTPRequestHandler):
    server: "HTTPFrontendServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), fmt % args)

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            if self.path.split("?")[0] not in ("/health", "/metrics"):
                self.server.check_key(self.headers.get("Authorization", ""))
            fn()
        except (BrokenPipeError, ConnectionResetError):
            logger.info("client went away during %s", self.path)
        except HTTPError as e:
            self._error(e.status, str(e), e.param)
        except Exception as e:
            if status_of(e) == "INTERNAL":
                logger.exception("internal error on %s", self.path)
            self._error(status_of(e), str(e), getattr(e, "field", None))

    def _get(self) -> None:
        f = self.server.frontend
        path = self.path.split("?")[0]
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": f.orch.model_name, "object": "model", "created": self.server.started, "owned_by": "splitserve"}]})
        elif path == "/health":
            snap = f.orch.view.snapshot()
            ok = bool(snap.prefill) and bool(snap.decode)
            self._json(200 if ok else 503, {"status": "ok" if ok else "unavailable", "prefill_workers": len(snap.prefill), "decode_workers": len(snap.decode)})
        elif path == "/metrics":
            self._send(200, f.orch.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        elif path.startswith("/v1/requests/") and path.endswith("/timings"):
            rid = path[len("/v1/requests/") : -len("/timings")]
            t = f.orch.timings(rid)
            if t is None:
                raise HTTPError("NOT_FOUND", f"no timings for request {rid!r} (unknown, running, or too old)")
            self._json(200, t.to_dict())
        else:
            raise HTTPError("NOT_FOUND", f"no route GET {path}")

    def _post(self) -> None:
        f = self.server.frontend
        path = self.path.split("?")[0]
        if path not in ("/v1/completions", "/v1/chat/completions"):
            raise HTTPError("NOT_FOUND", f"no route POST {path}")
        body = self._body()
        kind = "chat" if path == "/v1/chat/completions" else "completion"
        inp = f.chat_input(body) if kind == "chat" else f.completion_input(body)
        stream = bool(_field(body, "stream", (bool,), False))
        options = _field(body, "stream_options", (dict,), {}) or {}
        mode, result = f.respond(kind, inp, stream, bool(options.get("include_usage")))
        if mode == "json":
            self._json(200, result, request_id=result["id"])
            return
        self._sse(result)

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise HTTPError("INVALID_ARGUMENT", f"body of {length} bytes is over the limit of {MAX_BODY}")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError("INVALID_ARGUMENT", f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError("INVALID_ARGUMENT", "the JSON body must be an object")
        return body

    def _sse(self, events: Iterator[dict]) -> None:
        it = iter(events)
        first = next(it)  # a failure before the first token still gets a proper status
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("x-request-id", first["id"])
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self._event(first)
            for event in it:
                self._event(event)
        except (BrokenPipeError, ConnectionResetError):
            it.close()  # the client left: abort both legs
            raise
        except Exception as e:  # after the headers: report in-band, as OpenAI does
            self._event({"error": {"message": str(e), "type": status_of(e), "code": http_status(e)}})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True

    def _event(self, event: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        self.wfile.flush()

    def _error(self, status: str, message: str, param: str | None) -> None:
        code = STATUSES.get(status, STATUSES["INTERNAL"])[1]
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if code in (429, 503) else {}
        self._json(code, {"error": {"message": message, "type": status.lower(), "param": param, "code": code}}, headers=headers)

    def _json(self, code: int, body: dict, request_id: str | None = None, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(body).encode(), "application/json", request_id, headers)

    def _send(self, code: int, data: bytes, content_type: str, request_id: str | None = None, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if request_id:
            self.send_header("x-request-id", request_id)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


class HTTPFrontendServer(ThreadingHTTPServer):
    daemon_threads = True
    # Connections that arrive together wait in the kernel's queue instead of being reset (the
    # standard library's default backlog is 5); the kernel caps it at net.core.somaxconn.
    request_queue_size = 4096

    def __init__(self, host: str, port: int, frontend: OpenAIFrontend, api_keys: frozenset[str]) -> None:
        super().__init__((host, port), _Handler)
        self.frontend = frontend
        self.api_keys = api_keys
        self.started = int(time.time())
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def check_key(self, header: str) -> None:
        if self.api_keys and header.removeprefix("Bearer ").strip() not in self.api_keys:
            raise HTTPError("UNAUTHENTICATED", "missing or unknown API key (send 'Authorization: Bearer KEY')")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
