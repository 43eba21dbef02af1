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

import asyncio
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import jinja2
import jinja2.sandbox
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitserve.engine.errors import EngineError, InvalidRequestError
from splitserve.engine.prompt import encode_prompt
from splitserve.engine.sampling_params import INT64_MIN, SamplingParams, TopLogprobs
from splitserve.engine.tokenizer import LONG_TEXT_CHARS
from splitserve.proto.status import STATUSES, StatusError, http_status, status_of
from splitserve.router.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Model,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from splitserve.router.orchestrator import Chunk, GenerateInput, Orchestrator

logger = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 1  # sent with 429 / 503: the condition is a worker's, and passes
LONG_CHAT_MESSAGES = 256  # more messages than this are rendered off the event loop (as long text is)
ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


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


def validation_error(exc: RequestValidationError, content_type: str = "application/json") -> JSONResponse:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return error_response("INVALID_ARGUMENT", f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}")
    loc = tuple(err.get("loc", ()))
    if loc in ((), ("body",)):
        media = content_type.split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):  # not read as JSON at all (curl -d sends a form type)
            got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
            return error_response("INVALID_ARGUMENT", f"the body must be JSON, sent with 'Content-Type: application/json' ({got})")
        return error_response("INVALID_ARGUMENT", f"the body must be a JSON object: {err['msg']}")
    param = _param(loc)
    message = "is not a field of this request (unknown fields are refused, not ignored)" if err["type"] == "extra_forbidden" else err["msg"]
    return error_response("INVALID_ARGUMENT", f"{param}: {message}", param)


@dataclass
class _Plan:
    """One API request as the cluster serves it: one request per choice, choice i of prompt p
    at index p * n + i."""

    kind: str  # "completion" | "chat"
    request_id: str
    inputs: list[GenerateInput]
    n: int
    logprobs: bool  # return them in the endpoint's OpenAI shape
    echo: list[str]  # per prompt: the text its choices start with (completions' echo)
    fields: dict[str, str]  # engine field -> the request's name for it, for errors
    include_usage: bool = False


@dataclass
class _Choice:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[TopLogprobs] = field(default_factory=list)
    started: bool = False
    offset: int = 0  # where its next token starts in its text (completions' logprobs)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    timings: dict | None = None

    def add(self, c: Chunk) -> None:
        self.text.append(c.text)
        self.tokens += c.token_ids
        self.logprobs += c.logprobs
        self.top += _tops(c)
        if c.finished:
            self.finish_reason, self.usage = c.finish_reason, c.usage
            self.timings = c.timings.to_dict() if c.timings else None


async def _client_left(request: Request) -> None:
    """Returns when the client has closed its connection (its body was read before)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)  # not expected after the body; never a busy loop


async def _unless_client_leaves(request: Request, work: asyncio.Future, request_id: str) -> bool:
    """Wait for `work` unless the client closes its connection first: then `work` is cancelled
    (closing the choices' streams aborts their legs) and False is returned."""
    left = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait((work, left), return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if left.done() and not left.cancelled() and left.exception() is not None:  # its connection broke: as gone
            logger.debug("watching the client of %s: %r", request_id, left.exception())
        if not work.done():  # the client left (or the server stops)
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    return not work.cancelled()


def _int64(n: int) -> int:
    """`n` wrapped into int64, as the seed of choice i (seed + i) must be at the top of the range."""
    return (n - INT64_MIN) % 2**64 + INT64_MIN


def _tops(c: Chunk) -> list[TopLogprobs]:
    """The chunk's most likely alternatives per token (empty when none were asked for)."""
    return c.top_logprobs if len(c.top_logprobs) == len(c.token_ids) else [[] for _ in c.token_ids]


class OpenAIFrontend:
    """Turns OpenAI request bodies into orchestrator calls and chunks into OpenAI responses."""

    def __init__(self, orchestrator: Orchestrator, chat_template: str | None, special_tokens: dict[str, str]) -> None:
        self.orch = orchestrator
        self.chat_template = chat_template
        self.special = special_tokens
        self.started = int(time.time())
        self._token_text: dict[int, str] = {}  # at most the vocabulary
        self._token_bytes: dict[int, list[int]] = {}

    # ---- requests ------------------------------------------------------------------------
    async def completion_plan(self, body: CompletionRequest) -> _Plan:
        body.check_supported()
        fields = {"top_logprobs": "logprobs"}
        with _renamed(fields):
            params = body.sampling_params(body.max_tokens, body.logprobs or 0)
        prompts = body.prompts()
        tok = self.orch.tokenizer
        # ids are checked before they are decoded (the tokenizer overflows on ids outside u32)
        echo = [p if isinstance(p, str) else tok.decode(encode_prompt(tok, self.orch.model_config.vocab_size, p), body.skip_special_tokens)
                for p in prompts] if body.echo else [""] * len(prompts)
        prompts = [await self.orch.encoded(p) for p in prompts]
        return self._plan("completion", body, prompts, params, body.logprobs is not None, echo, fields)

    async def chat_plan(self, body: ChatCompletionRequest) -> _Plan:
        body.check_supported()
        if not self.chat_template:
            raise InvalidRequestError("messages", "this model has no chat template (tokenizer_config.json has none); use /v1/completions")
        messages = [m.for_template() for m in body.messages]
        variables = body.chat_template_kwargs or {}
        taken = sorted(set(variables) & {"messages", "add_generation_prompt", "raise_exception", *self.special})
        if taken:
            raise InvalidRequestError("chat_template_kwargs", f"may not set {taken[0]!r}: the server sets it")
        def encode() -> list[int]:
            return self.orch.tokenizer.encode(render_chat(self.chat_template, messages, **variables, **self.special), add_special_tokens=False)

        # a long conversation takes seconds to render and encode: on a worker thread, not the event loop's
        long = len(messages) > LONG_CHAT_MESSAGES or sum(len(m["content"]) for m in messages) > LONG_TEXT_CHARS
        ids = await asyncio.to_thread(encode) if long else encode()
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # as OpenAI's chat: until the model stops or the context is full (completions keep 16)
            max_tokens = max(1, self.orch.context_limit() - len(ids))
        fields = chat_fields(body)
        with _renamed(fields):
            params = body.sampling_params(max_tokens, body.top_logprobs or 0)
        return self._plan("chat", body, [ids], params, body.logprobs, [""], fields)

    def _plan(self, kind: str, body: CompletionRequest | ChatCompletionRequest, prompts: list, params: SamplingParams, logprobs: bool,
              echo: list[str], fields: dict[str, str]) -> _Plan:
        rid, n = f"req-{uuid.uuid4().hex}", body.n
        many = len(prompts) * n > 1
        inputs = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                with _renamed(fields):  # choice i samples with seed + i: n choices, not n copies of one
                    choice = params if i == 0 or params.seed is None else replace(params, seed=_int64(params.seed + i))
                inputs.append(GenerateInput(prompt, choice, request_id=f"{rid}-{p * n + i}" if many else rid, model=body.model or "", kind=kind,
                                            slo_ttft_ms=body.slo_ttft_ms, slo_tpot_ms=body.slo_tpot_ms))
        options = body.stream_options
        if options is not None and not body.stream:  # as OpenAI's
            raise InvalidRequestError("stream_options", "is only allowed when stream is true")
        return _Plan(kind, rid, inputs, n, logprobs, echo, fields, bool(options and options.include_usage))

    # ---- responses -----------------------------------------------------------------------
    async def respond(self, plan: _Plan, stream: bool, request: Request) -> Response:
        with _renamed(plan.fields):
            streams = self.orch.generate_many(plan.inputs)  # validation errors raise here, before any byte is sent
        merged = _merged(streams, [inp.request_id for inp in plan.inputs], self.orch.discard)
        created = int(time.time())
        if not stream:  # a whole answer: its client is watched until it is ready
            collect = asyncio.ensure_future(self._collect(plan, merged, created))
            if not await _unless_client_leaves(request, collect, plan.request_id):
                return Response(status_code=499)  # nobody reads it
            return JSONResponse(collect.result().model_dump(exclude_none=False))
        # a stream: its client is watched until the first event (a prompt queued or prefilling
        # can take long), then Starlette watches it while the response is sent
        events = self._events(plan, merged, created)
        try:
            first_event = asyncio.ensure_future(anext(events))
            if not await _unless_client_leaves(request, first_event, plan.request_id):
                await events.aclose()
                return Response(status_code=499)
            first = first_event.result()  # a failure before the first tokens still gets its status
        except BaseException:
            await events.aclose()
            raise
        return StreamingResponse(_sse(first, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "x-request-id": plan.request_id})

    async def _collect(self, plan: _Plan, merged: AsyncIterator[tuple[int, Chunk]], created: int):
        choices = [_Choice() for _ in plan.inputs]
        try:
            async for k, c in merged:
                choices[k].add(c)
        finally:
            await merged.aclose()
        model, usage = self.orch.model_name, _usage(plan, [ch.usage for ch in choices])
        timings = [ch.timings for ch in choices]
        timings = timings[0] if len(timings) == 1 else timings
        if plan.kind == "chat":
            return ChatCompletionResponse(id=plan.request_id, created=created, model=model, usage=usage, timings=timings, choices=[
                ChatChoice(index=k, message=ChatDelta(role="assistant", content="".join(ch.text)), finish_reason=ch.finish_reason,
                           logprobs=self._chat_logprobs(ch.tokens, ch.logprobs, ch.top) if plan.logprobs else None)
                for k, ch in enumerate(choices)])
        out = []
        for k, ch in enumerate(choices):
            echo = plan.echo[k // plan.n]
            logprobs = self._completion_logprobs(ch.tokens, ch.logprobs, ch.top, len(echo), self._hidden(plan, k))[0] if plan.logprobs else None
            out.append(CompletionChoice(index=k, text=echo + "".join(ch.text), finish_reason=ch.finish_reason, logprobs=logprobs))
        return CompletionResponse(id=plan.request_id, created=created, model=model, usage=usage, timings=timings, choices=out)

    async def _events(self, plan: _Plan, merged: AsyncIterator[tuple[int, Chunk]], created: int) -> AsyncIterator[str]:
        model, chat = self.orch.model_name, plan.kind == "chat"
        choices = [_Choice() for _ in plan.inputs]
        try:
            async for k, c in merged:
                ch = choices[k]
                first, ch.started = not ch.started, True
                usage = None  # only in the closing usage chunk, and only when asked (stream_options.include_usage), as OpenAI
                if chat:
                    logprobs = self._chat_logprobs(c.token_ids, c.logprobs, _tops(c)) if plan.logprobs else None
                    delta = ChatDelta(role="assistant" if first else None, content=c.text)
                    event = ChatCompletionChunk(id=plan.request_id, created=created, model=model, usage=usage,
                                                choices=[ChatChunkChoice(index=k, delta=delta, finish_reason=c.finish_reason, logprobs=logprobs)])
                else:
                    echo = plan.echo[k // plan.n] if first else ""
                    ch.offset += len(echo)
                    logprobs = None
                    if plan.logprobs:
                        logprobs, ch.offset = self._completion_logprobs(c.token_ids, c.logprobs, _tops(c), ch.offset, self._hidden(plan, k))
                    event = CompletionResponse(id=plan.request_id, created=created, model=model, usage=usage,
                                               choices=[CompletionChoice(index=k, text=echo + c.text, finish_reason=c.finish_reason, logprobs=logprobs)])
                if c.finished:
                    ch.usage = c.usage
                yield event.model_dump_json(exclude_none=chat)
            if plan.include_usage:
                cls = ChatCompletionChunk if chat else CompletionResponse
                yield cls(id=plan.request_id, created=created, model=model, choices=[], usage=_usage(plan, [ch.usage for ch in choices])).model_dump_json()
        finally:
            await merged.aclose()

    # ---- logprobs in OpenAI's shapes -----------------------------------------------------
    def _token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.orch.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _bytes(self, token_id: int) -> list[int]:
        """The token's own bytes: a token holding part of a character shows U+FFFD as its text,
        but its bytes are the real ones, so that a client joining them gets the text back."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            raw = self._token_bytes[token_id] = list(self.orch.tokenizer.token_bytes(token_id))
        return raw

    def _chat_logprobs(self, tokens: list[int], logprobs: list[float], tops: list[TopLogprobs]) -> ChatLogprobs:
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": self._token(token_id), "logprob": logprob, "bytes": self._bytes(token_id)}

        return ChatLogprobs(content=[TokenLogprob(**entry(t, lp), top_logprobs=[TopLogprob(**entry(*alt)) for alt in alts])
                                     for t, lp, alts in zip(tokens, logprobs, tops)])

    def _hidden(self, plan: _Plan, k: int) -> frozenset[int]:
        """Token ids that choice k's text leaves out (special tokens, unless asked for)."""
        return self.orch.tokenizer.special_ids if plan.inputs[k].params.skip_special_tokens else frozenset()

    def _completion_logprobs(self, tokens: list[int], logprobs: list[float], tops: list[TopLogprobs], offset: int,
                             hidden: frozenset[int]) -> tuple[CompletionLogprobs, int]:
        """The tokens' logprobs, and the text offset after them (a `hidden` token takes no room
        in the text). Each position's dict holds the most likely tokens and the chosen one
        (OpenAI: up to logprobs + 1 entries)."""
        texts = [self._token(t) for t in tokens]
        offsets = []
        for token_id, text in zip(tokens, texts):
            offsets.append(offset)
            offset += 0 if token_id in hidden else len(text)
        top = [{**{self._token(a): b for a, b in alts}, text: lp} for text, lp, alts in zip(texts, logprobs, tops)]
        return CompletionLogprobs(tokens=texts, token_logprobs=list(logprobs), top_logprobs=top, text_offset=offsets), offset


def _usage(plan: _Plan, usages: list[dict[str, int] | None]) -> Usage:
    """The request's usage over its choices: each prompt counted once, every choice's output."""
    total = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    for k, u in enumerate(usages):
        u = u or {}
        total["completion_tokens"] += u.get("completion_tokens", 0)
        if k % plan.n == 0:
            total["prompt_tokens"] += u.get("prompt_tokens", 0)
            total["cached_tokens"] += u.get("cached_tokens", 0)
    return Usage.of(total)


async def _pull(stream: AsyncIterator[Chunk]) -> Chunk | None:
    return await anext(stream, None)


async def _merged(streams: list[AsyncIterator[Chunk]], request_ids: list[str], discard: Callable[[str], None]) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) from the choices' streams as chunks come. Every choice's first chunk
    is in before any is yielded, so a choice that fails before its first token fails the whole
    request with its own status, before a response starts; one that fails later fails the rest.
    Closing this closes (aborts) every stream."""
    pending: dict[asyncio.Task, int] = {}
    try:
        if len(streams) == 1:  # the common case: no task per chunk
            async for c in streams[0]:
                yield 0, c
            return
        for k, s in enumerate(streams):
            pending[asyncio.ensure_future(_pull(s))] = k
        await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in pending if t.done() and t.exception() is not None), None)
        if failed is not None:
            raise failed.exception()
        firsts, pending = sorted(pending.items(), key=lambda item: item[1]), {}
        ready = [(k, task.result()) for task, k in firsts]
        while True:
            for k, c in ready:
                if c is None:
                    continue
                yield k, c
                if not c.finished:
                    pending[asyncio.ensure_future(_pull(streams[k]))] = k
            if not pending:
                return
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            ready = [(pending.pop(task), task.result()) for task in sorted(done, key=pending.get)]
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            await s.aclose()
        for rid in request_ids:
            discard(rid)


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
    """The HTTP API, API key in the Authorization header; router/http_limits.py's `front_door`
    puts the body limits and CORS around it."""
    orch = frontend.orch
    # no redirect of /v1/completions/ to /v1/completions: it answered 307 to whatever host the
    # Host header named, without a body; an unknown path is a 404 in OpenAI's error shape
    app = FastAPI(title="splitserve", summary="OpenAI-compatible API of a disaggregated prefill/decode cluster", version="1",
                  redirect_slashes=False)
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
        return validation_error(e, request.headers.get("content-type", ""))

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        status = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(e.status_code, "INVALID_ARGUMENT")
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        response = error_response(status, message, code=405 if e.status_code == 405 else None)
        response.headers.update(e.headers or {})  # 405's Allow
        return response

    async def on_error(request: Request, e: Exception) -> JSONResponse:
        if status_of(e) == "INTERNAL":
            logger.exception("internal error on %s", request.url.path)
        return error_response(status_of(e), str(e), getattr(e, "field", None), getattr(e, "retry_after", None))

    # The errors with a status are answered where the connection lives on. Starlette answers a
    # handler of Exception itself and then re-raises, and uvicorn closes the connection: a
    # client reusing it (every pooled client) saw its next request reset. An unexpected error
    # still goes that way, so its answer says the connection closes.
    app.add_exception_handler(EngineError, on_error)
    app.add_exception_handler(StatusError, on_error)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception) -> JSONResponse:
        response = await on_error(request, e)
        response.headers["Connection"] = "close"
        return response

    @app.post("/v1/completions", dependencies=keyed, response_model=CompletionResponse, responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await frontend.respond(await frontend.completion_plan(body), body.stream, request)

    @app.post("/v1/chat/completions", dependencies=keyed, response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await frontend.respond(await frontend.chat_plan(body), body.stream, request)

    def model_card() -> Model:
        return Model(id=orch.model_name, created=frontend.started, max_model_len=orch.context_limit())

    @app.get("/v1/models", dependencies=keyed, response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model:path}", dependencies=keyed, response_model=Model, responses=ERRORS)
    async def model(model: str) -> Model:
        if model != orch.model_name:
            raise HTTPError("NOT_FOUND", f"model {model!r} is not served here; this cluster serves {orch.model_name!r}", "model")
        return model_card()

    @app.get("/v1/requests/{request_id}/timings", dependencies=keyed)
    async def timings(request_id: str) -> dict | list[dict]:
        """One request's timings; for the id of a response with several choices, each choice's."""
        t = orch.timings(request_id)
        if t is not None:
            return t.to_dict()
        choices = list(itertools.takewhile(lambda t: t is not None, (orch.timings(f"{request_id}-{k}") for k in itertools.count())))
        if not choices:
            raise HTTPError("NOT_FOUND", f"no timings for request {request_id!r} (unknown, running, or too old)")
        return [t.to_dict() for t in choices]

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
