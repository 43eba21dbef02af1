"""The limits of the HTTP front door, below FastAPI: what a hostile or broken client can hold,
and for how long. Every refusal is an OpenAI-shaped JSON error (router/http_api.py's shape);
at this level no request field is known yet, so `param` is null.

A connection's life cycle through `LimitedHttpProtocol` (uvicorn's httptools protocol):
    connected, or a response finished on a keep-alive connection: the header deadline is armed
    request line and headers arrive     -> more than max_header_bytes: 431; unparsable: 400
    headers complete                    -> deadline off; the request goes to the ASGI app
      `BodyLimits` reads the whole body -> more than max_request_bytes: 413; not all there
                                           within body_timeout_s: 408 (a Content-Length larger
                                           than what is sent, a body that never completes)
      the route runs and responds       -> a client that stops reading is cut off once a write
                                           has waited send_timeout_s (its request is aborted)
    the header deadline passes first    -> a partial request: 408; nothing sent at all: closed
Beyond uvicorn's `limit_concurrency` (a backstop above the orchestrator's cap on requests in
flight) the answer is 503 with Retry-After, as everywhere else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

import httptools
from starlette.middleware.cors import CORSMiddleware
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from splitserve.router.http_api import RETRY_AFTER_SECONDS, error_body

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HTTPLimits:
    max_request_bytes: int = 8 << 20
    max_header_bytes: int = 16 << 10
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    send_timeout_s: float = 30.0


def _json(status: str, message: str, code: int) -> bytes:
    return json.dumps(error_body(status, message, None, code)).encode()


class _HeadersTooLarge(Exception):
    pass


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size cap, a header deadline, a write deadline,
    and JSON error bodies where uvicorn writes plain text. `http_protocol(limits)` makes the
    class a server uses."""

    limits = HTTPLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial = False  # bytes of a request arrived while its headers are awaited

    # ---- the header deadline -------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _await_request(self) -> None:
        self._stop_header_timer()
        self._header_bytes, self._partial = 0, False
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_timed_out)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if not self._partial:  # an idle connection: nothing to answer
            self.transport.close()
            return
        self._refuse(408, "DEADLINE_EXCEEDED", f"the request line and headers did not arrive within {self.limits.header_timeout_s:g} s")

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:
            self._partial = True
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):  # not a pipelined one started
            self._await_request()

    # ---- the header size cap -------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)  # ": " and CRLF: an empty header is not free
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            raise _HeadersTooLarge  # the parser stops; uvicorn calls send_400_response

    # ---- answers written below the app ---------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what the parser refuses, called while its exception is handled."""
        err = sys.exc_info()[1]
        cause = err.__context__ if err is not None else None
        if isinstance(cause, _HeadersTooLarge):
            self._refuse(431, "INVALID_ARGUMENT", f"the request line and headers are larger than {self.limits.max_header_bytes} bytes")
            return
        detail = f"{err}" + (f" ({cause})" if cause is not None else "") if isinstance(err, httptools.HttpParserError) else msg
        self._refuse(400, "INVALID_ARGUMENT", f"malformed HTTP request: {detail}")

    def _refuse(self, code: int, status: str, message: str) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()  # a response is under way: another status line would corrupt it
            return
        body = _json(status, message, code)
        head = [STATUS_LINE[code]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def _start_asgi_task(self, cycle, app) -> None:
        if app is service_unavailable:  # uvicorn's limit_concurrency: its plain-text 503, as JSON with Retry-After
            app = _overloaded
        super()._start_asgi_task(cycle, _send_deadline(app, self.transport, self.flow, self.limits.send_timeout_s))


def _send_deadline(app, transport: asyncio.Transport, flow, timeout: float):
    """The app, with every write that waits for a client that does not read bounded by
    `timeout`: past it the connection is dropped, so the app sees the client gone and the
    request's legs are aborted."""

    async def guarded(scope, receive, send) -> None:
        async def timed_send(message) -> None:
            if not flow.write_paused:
                await send(message)
                return
            try:
                await asyncio.wait_for(send(message), timeout)
            except asyncio.TimeoutError:
                logger.warning("dropping a client that read nothing for %g s", timeout)
                transport.abort()  # connection_lost follows: receive() says http.disconnect

        await app(scope, receive, timed_send)

    return guarded


async def _overloaded(scope, receive, send) -> None:
    await _respond(send, 503, "UNAVAILABLE", "the router has too many connections and requests; retry shortly",
                   [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())])


async def _respond(send, code: int, status: str, message: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = _json(status, message, code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close"), *extra]
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def http_protocol(limits: HTTPLimits) -> type[LimitedHttpProtocol]:
    """The protocol class for `uvicorn.Config(http=...)`, with these limits."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})


def front_door(app, limits: HTTPLimits, cors_origins: list[str] | tuple[str, ...] = ()):
    """The ASGI app a router serves: `app` behind the body limits, and, when `cors_origins`
    (router.cors_origins) lists any, CORS around both, so that a browser page from those origins
    can read every answer: the app's, the body limits' 413 and 408, and the 500 of an unexpected
    error (Starlette answers that one outside the app's own middleware). Preflights are answered
    here, before any route or key check. The protocol's own 431 and 408 (headers too large or
    too slow) come before any header is known and carry none."""
    app = BodyLimits(app, limits)
    if not cors_origins:
        return app
    return CORSMiddleware(app, allow_origins=list(cors_origins), allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                          expose_headers=["x-request-id", "Retry-After"], max_age=600)


class _TooLarge(Exception):
    pass


class BodyLimits:
    """ASGI middleware: reads a request's whole body before the app sees it, at most
    `max_request_bytes` of it and within `body_timeout_s`, then hands the app that body. The
    routes take small JSON bodies that FastAPI would read whole anyway."""

    def __init__(self, app, limits: HTTPLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:  # refused before a byte of it is read
            await _respond(send, 413, "INVALID_ARGUMENT", f"the request body is {int(declared)} bytes; at most {limit} are accepted")
            return
        try:
            body = await asyncio.wait_for(self._read(receive, limit), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            await _respond(send, 408, "DEADLINE_EXCEEDED", f"the request body did not arrive within {self.limits.body_timeout_s:g} s")
            return
        except _TooLarge:
            await _respond(send, 413, "INVALID_ARGUMENT", f"the request body is larger than {limit} bytes")
            return
        if body is None:  # the client left
            return
        given = False

        async def replay():
            nonlocal given
            if given:
                return await receive()  # after the body: only the client leaving (http.disconnect)
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _read(receive, limit: int) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
