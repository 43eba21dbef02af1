"""router/http_limits.py on uvicorn, around a toy ASGI app (no cluster): each limit answers with
its status and the OpenAI error shape, at its deadline and not later; a client that stops
reading is cut off and its app sees it gone."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from splitserve.router.http_limits import BodyLimits, HTTPLimits, http_protocol

LIMITS = HTTPLimits(max_request_bytes=1000, max_header_bytes=2000, header_timeout_s=0.5, body_timeout_s=0.5, send_timeout_s=0.5)


class App:
    """/echo answers the body's length; /stream sends until the client is gone, and notes when."""

    def __init__(self) -> None:
        self.gone = threading.Event()

    async def __call__(self, scope, receive, send) -> None:
        message = await receive()
        if scope["path"] == "/stream":
            await self._stream(receive, send)
            return
        body = json.dumps({"length": len(message["body"])}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, receive, send) -> None:
        watch = asyncio.ensure_future(receive())  # the next message is the client leaving
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while not watch.done():
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        self.gone.set()


@pytest.fixture
def server() -> Iterator[tuple[tuple[str, int], App]]:
    app = App()
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(BodyLimits(app, LIMITS), http=http_protocol(LIMITS), ws="none", limit_concurrency=4, lifespan="off", log_level="error")
    srv = uvicorn.Server(config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(srv.serve(sockets=[sock]),), daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield sock.getsockname(), app
    srv.should_exit = True
    thread.join(10)
    sock.close()


def exchange(address, data: bytes, timeout: float = 5.0) -> tuple[int, dict, dict | None, float]:
    """Send `data`, read to EOF: (status, headers, JSON body or None, seconds)."""
    start = time.monotonic()
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None, time.monotonic() - start


def post(body: bytes, length: int | None = None, extra: bytes = b"") -> bytes:
    n = len(body) if length is None else length
    return b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + b"Content-Length: %d\r\n\r\n" % n + body


def error(got, status: int) -> str:
    code, headers, body, _ = got
    assert code == status and headers["content-type"] == "application/json", (code, headers, body)
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == status and body["error"]["param"] is None
    return body["error"]["message"]


def test_unparsable_http_is_a_json_400(server) -> None:
    address, _ = server
    assert "malformed HTTP request: Invalid method" in error(exchange(address, b"GARBAGE\r\n\r\n"), 400)
    assert "malformed HTTP request" in error(exchange(address, b"GET / HTTP/1.1\r\nHo\x01st: x\r\n\r\n"), 400)


def test_headers_beyond_the_cap_are_431(server) -> None:
    address, _ = server
    assert "larger than 2000 bytes" in error(exchange(address, post(b"{}", extra=b"X-Big: " + b"a" * 2000 + b"\r\n")), 431)
    assert "larger than 2000 bytes" in error(exchange(address, post(b"{}", extra=b"".join(b"X-%d: y\r\n" % i for i in range(300)))), 431)
    assert exchange(address, post(b"{}", extra=b"X-Ok: " + b"a" * 1500 + b"\r\n"))[0] == 200


def test_headers_that_stop_coming_are_408_and_an_idle_connection_is_closed(server) -> None:
    address, _ = server
    got = exchange(address, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Le")
    assert "did not arrive within 0.5 s" in error(got, 408) and 0.4 < got[3] < 2
    with socket.create_connection(address, timeout=5) as s:
        start = time.monotonic()
        assert s.recv(100) == b"" and time.monotonic() - start < 2  # closed, with nothing to say
    with socket.create_connection(address, timeout=5) as s:  # the deadline is re-armed after each response
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        assert b" 200 " in s.recv(65536)
        s.sendall(b"GET /echo HTTP/1.1\r\nHo")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
        assert raw.startswith(b"HTTP/1.1 408 "), raw


def test_bodies_too_large_are_413_and_too_slow_408(server) -> None:
    address, _ = server
    assert "at most 1000 are accepted" in error(exchange(address, post(b"", length=10**9)), 413)  # refused unread
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert "larger than 1000 bytes" in error(exchange(address, chunked + b"".join(b"100\r\n" + b"a" * 256 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"), 413)
    got = exchange(address, post(b"{}", length=3))  # a Content-Length larger than the body
    assert "did not arrive within 0.5 s" in error(got, 408) and 0.4 < got[3] < 2
    got = exchange(address, chunked + b"2\r\n{}\r\n")  # a body that never completes
    assert error(got, 408) and 0.4 < got[3] < 2
    assert exchange(address, post(b"a" * 1000))[2] == {"length": 1000}
    assert exchange(address, chunked + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")[2] == {"length": 5}


def test_a_client_that_stops_reading_is_cut_off(server) -> None:
    address, app = server
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(address)
    s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")  # then reads nothing
    assert app.gone.wait(10), "the app never saw the client gone"
    s.close()


def test_beyond_the_connection_backstop_the_answer_is_a_json_503_with_retry_after(server) -> None:
    address, _ = server
    held = [socket.create_connection(address) for _ in range(4)]  # limit_concurrency=4 counts connections
    try:
        time.sleep(0.1)
        code, headers, body, _ = exchange(address, post(b"{}"))
        assert code == 503 and headers["retry-after"] == "1" and body["error"]["type"] == "unavailable", (code, headers, body)
    finally:
        for s in held:
            s.close()
