"""OpenAI-compatible HTTP API on FastAPI: /v1/completions, /v1/chat/completions (SSE streaming or
not), /v1/models, /health, /metrics, /v1/requests/{id}/timings (where a request's time went),
and /docs + /openapi.json.

Bodies are pydantic models (router/openai_protocol.py); a wrong type, a bad value or an unknown
field is a 400 whose message and `param` name the field; a body that is not JSON at all (cut
short, not UTF-8, nested too deeply) is a 400 that says which. Errors use the OpenAI error
shape, with statuses from proto.status. What is refused before a request reaches a route
(oversized, too slow, unparsable HTTP) is router/http_limits.py's. A streaming request's first
chunk is awaited before the response starts, so a failure before the first token still gets its
own status; later failures are reported in-band, as OpenAI does. A client that disconnects
aborts its request's two legs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import jinja2
import jinja2.sandbox
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitserve.engine.errors import InvalidRequestError
from splitserve.proto.status import STATUSES, http_status, status_of
from splitserve.router.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Model,
    ModelList,
    Usage,
)
from splitserve.router.orchestrator import Chunk, GenerateInput, Orchestrator

logger = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 1  # sent with 429 / 503: the condition is a worker's, and passes
ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


class HTTPError(Exception):
    def __init__(self, status: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def render_chat(template: str, messages: list[dict], **special: Any) -> str:
    """Render a checkpoint's chat template (tokenizer_config.json) for a new assistant turn.
    Messages the template cannot render (it raised, or failed on their content) are the
    request's fault: InvalidRequestError naming `messages`."""

    def raise_exception(message: str) -> None:
        raise InvalidRequestError("messages", message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)  # a broken template is the checkpoint's fault, not the request's
    try:
        return compiled.render(messages=messages, add_generation_prompt=True, **special)
    except InvalidRequestError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, RecursionError) as e:
        raise InvalidRequestError("messages", f"the chat template cannot render these messages: {type(e).__name__}: {e}") from None


def error_body(status: str, message: str, param: str | None = None, code: int | None = None) -> dict:
    """The OpenAI error shape. `code` is the HTTP status: the canonical status's (proto.status)
    unless the HTTP layer has a more precise one (405, 408, 413, 431)."""
    code = code or STATUSES.get(status, STATUSES["INTERNAL"])[1]
    return {"error": {"message": message, "type": status.lower(), "param": param, "code": code}}


def error_response(status: str, message: str, param: str | None = None, retry_after: float | None = None,
                   code: int | None = None) -> JSONResponse:
    body = error_body(status, message, param, code)
    code = body["error"]["code"]
    headers = {"Retry-After": str(math.ceil(retry_after or RETRY_AFTER_SECONDS))} if code in (429, 503) else None
    return JSONResponse(body, status_code=code, headers=headers)


def _param(loc: tuple) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unparsable(cause: BaseException) -> str:
    """Why a body FastAPI could not decode is not JSON, for the client."""
    if isinstance(cause, RecursionError):
        return "malformed JSON body: nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 JSON: {cause.reason} at byte {cause.start}"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "malformed JSON body: an integer has too many digits"
    return f"malformed JSON body: {type(cause).__name__}"


class JSONBodyRoute(APIRoute):
    """A route whose body decode errors say what is wrong with the body. FastAPI turns every
    failure to decode a JSON body other than a syntax error (invalid UTF-8, nesting too deep
    for the parser, an integer too long to convert) into one 'There was an error parsing the
    body'."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except StarletteHTTPException as e:
                if e.status_code == 400 and e.__cause__ is not None:
                    raise HTTPError("INVALID_ARGUMENT", _unparsable(e.__cause__)) from None
                raise

        return route


def validation_error(exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return error_response("INVALID_ARGUMENT", f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}")
    loc = tuple(err.get("loc", ()))
    if loc in ((), ("body",)):
        return error_response("INVALID_ARGUMENT", f"the body must be a JSON object: {err['msg']}")
    param = _param(loc)
    message = "is not a field of this request (unknown fields are refused, not ignored)" if err["type"] == "extra_forbidden" else err["msg"]
    return error_response("INVALID_ARGUMENT", f"{param}: {message}", param)


class OpenAIFrontend:
    """Turns OpenAI request bodies into orchestrator calls and chunks into OpenAI responses."""

    def __init__(self, orchestrator: Orchestrator, chat_template: str | None, special_tokens: dict[str, str]) -> None:
        self.orch = orchestrator
        self.chat_template = chat_template
        self.special = special_tokens
        self.started = int(time.time())

    def completion_input(self, body: CompletionRequest) -> GenerateInput:
        body.check_supported()
        return GenerateInput(body.single_prompt(), body.sampling_params(body.max_tokens), model=body.model or "",
                             slo_ttft_ms=body.slo_ttft_ms, slo_tpot_ms=body.slo_tpot_ms)

    def chat_input(self, body: ChatCompletionRequest) -> GenerateInput:
        body.check_supported()
        if not self.chat_template:
            raise InvalidRequestError("messages", "this model has no chat template (tokenizer_config.json has none); use /v1/completions")
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
        ids = self.orch.tokenizer.encode(render_chat(self.chat_template, messages, **self.special), add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        with _renamed(chat_fields(body)):
            params = body.sampling_params(max_tokens)
        return GenerateInput(ids, params, model=body.model or "", kind="chat", slo_ttft_ms=body.slo_ttft_ms, slo_tpot_ms=body.slo_tpot_ms)

    async def respond(self, kind: str, inp: GenerateInput, stream: bool, include_usage: bool, fields: dict[str, str] | None = None) -> Response:
        with _renamed(fields or {}):
            chunks = self.orch.generate(inp)  # validation errors raise here, before any byte is sent
        created = int(time.time())
        if not stream:
            return JSONResponse((await self._collect(kind, chunks, created)).model_dump(exclude_none=False), headers=None)
        events = self._events(kind, chunks, created, include_usage)
        try:
            first = await anext(events)  # a failure before the first token still gets its status
        except BaseException:
            await events.aclose()
            raise
        return StreamingResponse(_sse(first, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "x-request-id": json.loads(first)["id"]})

    async def _collect(self, kind: str, chunks: AsyncIterator[Chunk], created: int):
        text, last = [], None
        try:
            async for c in chunks:
                text.append(c.text)
                last = c
        finally:
            await chunks.aclose()
        body, model = "".join(text), self.orch.model_name
        timings = last.timings.to_dict() if last.timings else None
        if kind == "chat":
            return ChatCompletionResponse(id=last.request_id, created=created, model=model, usage=Usage.of(last.usage), timings=timings,
                                          choices=[ChatChoice(message=ChatDelta(role="assistant", content=body), finish_reason=last.finish_reason)])
        return CompletionResponse(id=last.request_id, created=created, model=model, usage=Usage.of(last.usage), timings=timings,
                                  choices=[CompletionChoice(text=body, finish_reason=last.finish_reason)])

    async def _events(self, kind: str, chunks: AsyncIterator[Chunk], created: int, include_usage: bool) -> AsyncIterator[str]:
        model, first = self.orch.model_name, True
        try:
            async for c in chunks:
                usage = Usage.of(c.usage) if c.finished and not include_usage else None
                if kind == "chat":
                    delta = ChatDelta(role="assistant" if first else None, content=c.text)
                    event = ChatCompletionChunk(id=c.request_id, created=created, model=model, usage=usage,
                                                choices=[ChatChunkChoice(delta=delta, finish_reason=c.finish_reason)])
                else:
                    event = CompletionResponse(id=c.request_id, created=created, model=model, usage=usage,
                                               choices=[CompletionChoice(text=c.text, finish_reason=c.finish_reason)])
                first = False
                yield event.model_dump_json(exclude_none=kind == "chat")
                if c.finished and include_usage:
                    cls = ChatCompletionChunk if kind == "chat" else CompletionResponse
                    yield cls(id=c.request_id, created=created, model=model, choices=[], usage=Usage.of(c.usage)).model_dump_json()
        finally:
            await chunks.aclose()


def chat_fields(body: ChatCompletionRequest) -> dict[str, str]:
    """The engine's field names -> the chat request's, for errors: its prompt is `messages`, its
    output length `max_completion_tokens` when it sent that."""
    return {"prompt": "messages", **({"max_tokens": "max_completion_tokens"} if body.max_completion_tokens is not None else {})}


@contextmanager
def _renamed(names: dict[str, str]) -> Iterator[None]:
    """Re-raise an InvalidRequestError about an engine field under the name the client used."""
    try:
        yield
    except InvalidRequestError as e:
        if e.field not in names:
            raise
        raise type(e)(names[e.field], str(e).split(": ", 1)[-1]) from None


async def _sse(first: str, events: AsyncIterator[str]) -> AsyncIterator[bytes]:
    try:
        yield b"data: " + first.encode() + b"\n\n"
        async for event in events:
            yield b"data: " + event.encode() + b"\n\n"
    except Exception as e:  # after the headers: report in-band, as OpenAI does
        if status_of(e) == "INTERNAL":
            logger.exception("stream failed")
        yield b"data: " + json.dumps({"error": {"message": str(e), "type": status_of(e).lower(), "code": http_status(e)}}).encode() + b"\n\n"
    finally:
        await events.aclose()
    yield b"data: [DONE]\n\n"


def build_app(frontend: OpenAIFrontend, api_keys: frozenset[str]) -> FastAPI:
    orch = frontend.orch
    app = FastAPI(title="splitserve", summary="OpenAI-compatible API of a disaggregated prefill/decode cluster", version="1")
    app.router.route_class = JSONBodyRoute

    async def check_key(request: Request) -> None:
        header = request.headers.get("authorization", "")
        if api_keys and header.removeprefix("Bearer ").strip() not in api_keys:
            raise HTTPError("UNAUTHENTICATED", "missing or unknown API key (send 'Authorization: Bearer KEY')")

    keyed = [Depends(check_key)]

    @app.exception_handler(HTTPError)
    async def on_http_error(request: Request, e: HTTPError) -> JSONResponse:
        return error_response(e.status, str(e), e.param)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return validation_error(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        status = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(e.status_code, "INVALID_ARGUMENT")
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(status, message, code=405 if e.status_code == 405 else None)

    @app.exception_handler(Exception)
    async def on_error(request: Request, e: Exception) -> JSONResponse:
        if status_of(e) == "INTERNAL":
            logger.exception("internal error on %s", request.url.path)
        return error_response(status_of(e), str(e), getattr(e, "field", None), getattr(e, "retry_after", None))

    @app.post("/v1/completions", dependencies=keyed, response_model=CompletionResponse, responses=ERRORS)
    async def completions(body: CompletionRequest) -> Response:
        options = body.stream_options
        return await frontend.respond("completion", frontend.completion_input(body), body.stream, bool(options and options.include_usage))

    @app.post("/v1/chat/completions", dependencies=keyed, response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        options = body.stream_options
        return await frontend.respond("chat", frontend.chat_input(body), body.stream, bool(options and options.include_usage), chat_fields(body))

    @app.get("/v1/models", dependencies=keyed, response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[Model(id=orch.model_name, created=frontend.started)])

    @app.get("/v1/requests/{request_id}/timings", dependencies=keyed)
    async def timings(request_id: str) -> dict:
        t = orch.timings(request_id)
        if t is None:
            raise HTTPError("NOT_FOUND", f"no timings for request {request_id!r} (unknown, running, or too old)")
        return t.to_dict()

    @app.get("/health")
    async def health() -> JSONResponse:
        snap = orch.view.snapshot()
        ok = (bool(snap.prefill) or orch.colocated) and bool(snap.decode)
        body = {"status": "ok" if ok else "unavailable", "prefill_workers": len(snap.prefill), "decode_workers": len(snap.decode)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(orch.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
