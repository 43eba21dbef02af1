"""Hostile input for the router's two front doors, generated from a seed: the same seed sends the
same bytes. HTTP cases are raw bytes over a socket (so nothing on the client side cleans them up);
gRPC cases are bad parameters through the SDK's request builder and raw bytes to every public
method of the router's services.

Every case says what a correct server answers: an HTTP case names the request field a 400 must
name (`field`), or None where there is no field to name (the bytes are not JSON, not HTTP, too
large, too slow); `deadline` is how long its client waits for the answer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from dataclasses import dataclass

from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from splitserve.proto import public_pb2
from splitserve.proto.client import InvalidArgumentError, _request

COMPLETION = {"prompt": "hi", "max_tokens": 1, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
SAMPLING = ["model", "stream", "stream_options", "temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "user",
            "logit_bias", "min_tokens", "repetition_penalty", "top_k", "ignore_eos", "stop_token_ids", "skip_special_tokens", "slo_ttft_ms", "slo_tpot_ms", "max_tokens"]
FIELDS = {
    "/v1/completions": (COMPLETION, [*SAMPLING, "prompt", "echo", "logprobs", "best_of", "suffix"]),
    "/v1/chat/completions": (CHAT, [*SAMPLING, "messages", "max_completion_tokens", "logprobs", "top_logprobs"]),
}
UNKNOWN_FIELDS = ["foo", "", "__proto__", "functions", "Prompt", "max_tokens ", "\u00e9"]
DEEP = 3000  # beyond what Python's JSON parser nests: the body is not JSON at all

# Raw JSON text of hostile values. Those that make the whole body unparsable come second.
VALUES = [
    '"a string"', '""', "true", "false", "null", "[]", "{}", '[1, "a"]', '{"a": 1}', "[[1]]", "[null]", '["x", 1]', "[true]",
    "0", "-1", "1", "2", "1.5", "-0.0", "2147483647", "2147483648", "-2147483649", "9223372036854775807", "9223372036854775808",
    "-9223372036854775809", "1" + "0" * 30, "-1" + "0" * 30, "123456789" * 100, "1e308", "-1e308", "1e999", "-1e999", "NaN", "Infinity",
    "-Infinity", "1e-320", "4.9e-324", '"\\ud800"', '"x\\udfff"', '"\\u0000"', '"\\ud83d\\ude00"', json.dumps("x" * 300), json.dumps("a" * 100_000),
    '"\\n\\r\\t"', json.dumps(["x"] * 5000), json.dumps(list(range(5000))), json.dumps([2**40]), json.dumps([-1]), json.dumps([[1, 2], [3]]),
    json.dumps(["a", "b"]), json.dumps([""]), "[" * 50 + "]" * 50, '{"a":' * 200 + "1" + "}" * 200, json.dumps([{"type": "text", "text": 5}]),
    json.dumps({"include_usage": "yes"}), json.dumps({"include_usage": True, "x": 1}), json.dumps([{"role": "user"}]),
]
BODY_LEVEL = ["[" * DEEP + "]" * DEEP, '{"a":' * DEEP + "1" + "}" * DEEP, "9" * 5000]
MESSAGE_FIELDS = ["role", "content", "name"]
CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml", "", "application/json; charset=utf-16",
                 "application/json;;;", "APPLICATION/JSON", "application/ld+json", "*/*", "application/octet-stream", "json", "application/jsonx",
                 "text/json", "application/json; charset=latin-1", "image/png"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO", "CONNECT", "PRI", "get", "M-SEARCH", "PROPFIND"]
PATHS = ["/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/v1/models", "/", "/v1", "/v1/", "/v2/completions", "/v1/completions/",
         "/v1/requests/nope/timings", "/v1/requests//timings", "/v1/requests/%00/timings", "/..%2f..%2fetc/passwd", "//", "/v1/completions?x=%ff%fe",
         "/%ff%fe", "/docs", "/openapi.json", "/v1/embeddings", "/" + "a" * 8000, "/v1/completions#frag", "/v1/models/../models", "/\u00e9".encode().decode("latin-1")]


@dataclass
class HTTPCase:
    category: str
    data: bytes  # sent at once; `rest` follows later, or never
    field: str | None = None  # a 400 must name this field; None: no field to name
    rest: list[bytes] = dataclasses.field(default_factory=list)  # trickled, one piece per `pause` seconds
    pause: float = 0.0
    deadline: float = 20.0  # the answer must come within this
    head: bool = False  # a HEAD request: a status, no body to check


@dataclass
class Answer:
    status: int | None  # None: the connection closed with no answer
    headers: dict[str, str]
    body: bytes
    seconds: float


def request(method: str, path: str, body: bytes = b"", content_type: str | None = "application/json", extra: bytes = b"",
            length: int | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n".encode("latin-1")
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n".encode("latin-1")
    if body or length is not None or method == "POST":
        head += f"Content-Length: {len(body) if length is None else length}\r\n".encode()
    return head + extra + b"\r\n" + body


def _with(base: dict, name: str, raw: str) -> bytes:
    """`base` as JSON with `name` set to the raw JSON text `raw` (which json.dumps could not write)."""
    rest = {k: v for k, v in base.items() if k != name}
    text = json.dumps(rest)
    return (text[:-1] + (", " if rest else "") + json.dumps(name) + ": " + raw + "}").encode("utf-8", "surrogatepass")


def field_cases(rng: random.Random) -> list[HTTPCase]:
    """Every field of both endpoints (and unknown ones, each field of a chat message and of a
    content part) set to every hostile value."""
    cases = []
    for path, (base, names) in FIELDS.items():
        for name in names:
            for raw in VALUES:
                cases.append(HTTPCase("fields", request("POST", path, _with(base, name, raw)), name))
            for raw in BODY_LEVEL:
                cases.append(HTTPCase("nesting and huge numbers", request("POST", path, _with(base, name, raw)), None))
        for name in rng.sample(UNKNOWN_FIELDS, 3):
            cases.append(HTTPCase("fields", request("POST", path, _with(base, name, rng.choice(VALUES))), name))
    for name in MESSAGE_FIELDS + ["extra"]:
        for raw in VALUES:
            message = json.dumps({k: v for k, v in CHAT["messages"][0].items() if k != name})
            message = message[:-1] + f', "{name}": {raw}}}'
            body = json.dumps({k: v for k, v in CHAT.items() if k != "messages"})[:-1] + f', "messages": [{message}]}}'
            cases.append(HTTPCase("fields", request("POST", "/v1/chat/completions", body.encode("utf-8", "surrogatepass")), "messages"))
    for raw in VALUES:  # a content part's fields
        part = rng.choice([f'{{"type": {raw}, "text": "x"}}', f'{{"type": "text", "text": {raw}}}', f'{{"type": "text", "text": "x", "y": {raw}}}'])
        body = f'{{"max_tokens": 1, "messages": [{{"role": "user", "content": [{part}]}}]}}'
        cases.append(HTTPCase("fields", request("POST", "/v1/chat/completions", body.encode("utf-8", "surrogatepass")), "messages"))
    return cases


def body_cases(rng: random.Random) -> list[HTTPCase]:
    """Bodies that are not a JSON object: cut short, not UTF-8, not an object, nested without end,
    random bytes."""
    cases = []
    for path, (base, _) in FIELDS.items():
        valid = json.dumps({**base, "stop": ["\u00e9\u00e8"], "user": "\u65e5\u672c"}).encode()
        for cut in sorted(rng.sample(range(len(valid)), 30)):
            cases.append(HTTPCase("truncated JSON", request("POST", path, valid[:cut])))
        for _ in range(20):
            at = rng.randrange(len(valid))
            bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\x80", b"\xfe\xff"])
            cases.append(HTTPCase("invalid UTF-8", request("POST", path, valid[:at] + bad + valid[at:])))
        for text in ["[]", "1", '"s"', "null", "true", "[" + json.dumps(base) + "]", "", " ", "\n", "{}", json.dumps(base) + json.dumps(base),
                     json.dumps(base) + "x", "\ufeff" + json.dumps(base), '{"prompt": "a", "prompt": 5}']:
            cases.append(HTTPCase("not an object", request("POST", path, text.encode())))
        cases.append(HTTPCase("not an object", request("POST", path, json.dumps(base).encode("utf-16"))))
        for depth in (100, 999, 1000, 10_000, 100_000):
            for open_, close in (("[", "]"), ('{"a":', "}")):
                cases.append(HTTPCase("nesting and huge numbers", request("POST", path, (open_ * depth + "1" + close * depth).encode())))
        for _ in range(20):
            cases.append(HTTPCase("random bytes", request("POST", path, rng.randbytes(rng.randrange(1, 2000)))))
            printable = "".join(rng.choice('{}[]":,0123456789.eE+-truefalsnl \\u') for _ in range(rng.randrange(1, 300)))
            cases.append(HTTPCase("random bytes", request("POST", path, printable.encode())))
    return cases


def content_type_cases() -> list[HTTPCase]:
    cases = []
    for path, (base, _) in FIELDS.items():
        for ct in CONTENT_TYPES:
            cases.append(HTTPCase("content types", request("POST", path, json.dumps(base).encode(), content_type=ct)))
        cases.append(HTTPCase("content types", request("POST", path, json.dumps(base).encode(), content_type=None)))
        cases.append(HTTPCase("content types", request("POST", path, b"prompt=hi&max_tokens=1", content_type="application/x-www-form-urlencoded")))
        cases.append(HTTPCase("content types", request("POST", path, b"--x\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi\r\n--x--\r\n",
                                                      content_type="multipart/form-data; boundary=x")))
    return cases


def route_cases(rng: random.Random) -> list[HTTPCase]:
    """Unknown paths and methods, and known paths with methods they do not take."""
    cases = []
    for method in METHODS:
        for path in PATHS:
            body = json.dumps(COMPLETION).encode() if method in ("POST", "PUT", "PATCH") else b""
            cases.append(HTTPCase("paths and methods", request(method, path, body), head=method == "HEAD"))
    for _ in range(30):
        path = "/" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-._~%/:@!$&'()*+,;=") for _ in range(rng.randrange(1, 80)))
        cases.append(HTTPCase("paths and methods", request(rng.choice(["GET", "POST"]), path, b"{}")))
    return cases


def protocol_cases(rng: random.Random, max_header_bytes: int) -> list[HTTPCase]:
    """Bytes that are not HTTP/1.1 a server can parse, and headers beyond the size limit."""
    body = json.dumps(COMPLETION).encode()
    lines = [b"GARBAGE\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET / FOO/1.1\r\n\r\n", b"\r\n\r\n\r\n", b"GET /\x00 HTTP/1.1\r\n\r\n",
             b"GET / HTTP/1.1\r\nHost x\r\n\r\n", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", b"GET / HTTP/1.1\r\nHo\x01st: x\r\n\r\n",
             b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\x00y\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
             b"GET /health HTTP/1.1\nHost: x\n\n", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{}",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n{}",
             b"GET /health HTTP/1.0\r\n\r\n", b"GET /health HTTP/1.1\r\n\r\n", b"GET http://x/health HTTP/1.1\r\nHost: x\r\n\r\n",
             b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
             b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
             b"GET /health HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)]
    cases = [HTTPCase("protocol garbage", line) for line in lines]
    for _ in range(40):
        cases.append(HTTPCase("protocol garbage", rng.randbytes(rng.randrange(1, 400)) + b"\r\n\r\n"))
    for _ in range(20):  # a valid request with one byte changed
        valid = bytearray(request("POST", "/v1/completions", body))
        valid[rng.randrange(len(valid))] = rng.randrange(256)
        cases.append(HTTPCase("protocol garbage", bytes(valid)))
    big = max_header_bytes + 1
    for extra in [b"X-Big: " + b"a" * big + b"\r\n", b"".join(b"X-%d: y\r\n" % i for i in range(big // 8 + 1)), b"Cookie: " + b"c=1; " * (big // 5) + b"\r\n"]:
        cases.append(HTTPCase("oversized headers", request("POST", "/v1/completions", body, extra=extra)))
    cases.append(HTTPCase("oversized headers", request("GET", "/health?" + "q" * big)))
    cases.append(HTTPCase("oversized headers", request("GET", "/" + "p" * big)))
    return cases


def slow_cases(rng: random.Random, body_timeout: float, header_timeout: float, max_request_bytes: int) -> list[HTTPCase]:
    """A Content-Length larger than the body, bodies that never complete or trickle, headers
    that never complete, bodies over the size limit."""
    body = json.dumps(COMPLETION).encode()
    wait = 10 + 3 * max(body_timeout, header_timeout)
    cases = []
    for _ in range(30):
        short = rng.randrange(1, 10_000)
        cases.append(HTTPCase("Content-Length larger than the body", request("POST", rng.choice(list(FIELDS)), body, length=len(body) + short), deadline=wait))
    chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    for _ in range(15):
        cut = rng.randrange(1, len(body))  # a chunk of 0 would end the body
        cases.append(HTTPCase("body never completes", chunked + b"%x\r\n" % cut + body[:cut] + b"\r\n", deadline=wait))
    for _ in range(5):  # one byte at a time, slower than the body deadline allows in all
        full = request("POST", "/v1/completions", body)
        split = full.index(b"\r\n\r\n") + 4
        pieces = [full[i:i + 1] for i in range(split, len(full))]
        cases.append(HTTPCase("body never completes", full[:split], rest=pieces, pause=body_timeout / 4, deadline=wait))
    for _ in range(10):
        head = request("POST", "/v1/completions", body)
        cases.append(HTTPCase("headers never complete", head[:rng.randrange(1, head.index(b"\r\n\r\n"))], deadline=wait))
    over = max_request_bytes + 1
    for _ in range(5):
        cases.append(HTTPCase("body too large", request("POST", rng.choice(list(FIELDS)), b"", length=over + rng.randrange(10**6)), deadline=wait))
        big = b'{"prompt": "' + b"a" * over + b'"}'
        cases.append(HTTPCase("body too large", chunked.replace(b"/v1/completions", rng.choice(list(FIELDS)).encode())
                              + b"".join(b"%x\r\n" % len(big[i:i + 65536]) + big[i:i + 65536] + b"\r\n" for i in range(0, len(big), 65536)) + b"0\r\n\r\n",
                              deadline=wait))
    return cases


async def send(host: str, port: int, case: HTTPCase) -> Answer:
    """Send a case's bytes and read the answer until the server closes (every case asks for
    `Connection: close` or is refused with it). Reading runs alongside writing, so an answer
    that comes before the last piece (a trickle cut off) is read before writing on into the
    closed connection resets it."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    reader, writer = await asyncio.open_connection(host, port)
    received: list[bytes] = []

    async def read() -> None:
        try:
            while chunk := await reader.read(65536):
                received.append(chunk)
        except ConnectionResetError:
            pass

    async def write() -> None:
        try:
            writer.write(case.data)
            for piece in case.rest:
                await asyncio.sleep(case.pause)
                writer.write(piece)
                await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass

    reading = asyncio.ensure_future(read())
    writing = asyncio.ensure_future(write())
    try:
        await asyncio.wait_for(asyncio.shield(reading), case.deadline)
    except asyncio.TimeoutError:
        reading.cancel()
    finally:
        writing.cancel()
        writer.close()
    return parse(b"".join(received), loop.time() - start)


def parse(raw: bytes, seconds: float) -> Answer:
    if not raw:
        return Answer(None, {}, b"", seconds)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    if status == 100:  # an interim answer to Expect: 100-continue; the real one follows
        return parse(body, seconds)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        while body:
            size, _, body = body.partition(b"\r\n")
            n = int(size, 16)
            out, body = out + body[:n], body[n + 2:]
            if n == 0:
                break
        body = out
    return Answer(status, headers, body, seconds)


# ---- gRPC -------------------------------------------------------------------------------
@dataclass
class GRPCCase:
    category: str
    method: str  # "/package.Service/Method"
    payload: bytes
    server_streaming: bool
    field: str | None = None  # INVALID_ARGUMENT must name this (a field, or the message type)


SDK_VALUES = {
    "max_tokens": [-1, 0, 2**31 - 1, 5000, -(2**31)], "temperature": [float("nan"), float("inf"), -1.0, 1e39, -0.0], "top_p": [0.0, -1.0, 2.0, float("nan"), 1e-45],
    "top_k": [-1, 2**31 - 1, -(2**31)], "seed": [-(2**63), 2**63 - 1], "stop": [["x"] * 17, [""], ["x" * 300], ["\x00"], ["a"] * 16],
    "stop_token_ids": [[-1], [2**31 - 1], list(range(65)), [-(2**31)]], "slo_ttft_ms": [float("nan"), -1.0, 0.0, float("inf"), 1e308],
    "slo_tpot_ms": [float("nan"), -5.0, 0.0], "request_id": ["r" * 257, "r" * 100_000, "\x00", " "], "model": ["nope", "\x00" * 10, "m" * 10_000],
    "prompt": ["", [], [-1], [512], [2**31 - 1], [0] * 5000, "x" * 20_000, "\x00", [-(2**31)]],
    "min_tokens": [-1, 2, 2**31 - 1], "logit_bias": [{-1: 1.0}, {512: 1.0}, {2**31 - 1: 1.0}, {0: 101.0}, {0: float("nan")}, {i: 1.0 for i in range(1025)}],
    "repetition_penalty": [0.0, -1.0, float("nan"), float("inf"), 1e7], "frequency_penalty": [3.0, float("nan")], "presence_penalty": [-3.0, float("inf")],
    "top_logprobs": [-1, 21, 2**31 - 1, 20],
}


def sdk_cases() -> list[GRPCCase]:
    """Bad parameters through the SDK's own request builder, sent as the SDK sends them."""
    cases = []
    for name, values in SDK_VALUES.items():
        for value in values:
            options = {"max_tokens": 1, "temperature": 0.0}
            prompt = value if name == "prompt" else "hi"
            if name != "prompt":
                options[name] = value
            try:
                req = _request(prompt, **options)
            except InvalidArgumentError as e:  # the SDK refuses it before sending (the HTTP cases send it), naming it
                assert str(e).startswith(f"{name}: "), (name, value, str(e))
                continue
            cases.append(GRPCCase("bad parameters (SDK)", "/splitserve.v1.Generation/Generate", req.SerializeToString(), True, name))
    for method, msg, name in [("Admin/Scale", public_pb2.ScaleRequest(prefill=-1), "prefill"), ("Admin/Scale", public_pb2.ScaleRequest(decode=-(2**31)), "decode"),
                              ("Admin/Drain", public_pb2.DrainRequest(worker_id="nope"), None), ("Admin/Drain", public_pb2.DrainRequest(worker_id="w" * 20_000), None),
                              ("Generation/GetTimings", public_pb2.TimingsRequest(request_id="\x00"), None),
                              ("Generation/GetTimings", public_pb2.TimingsRequest(request_id="\u00e9" * 20_000), None),
                              ("Generation/Abort", public_pb2.AbortRequest(request_id="x" * 10_000), None)]:
        cases.append(GRPCCase("bad parameters (SDK)", f"/splitserve.v1.{method}", msg.SerializeToString(), False, name))
    return cases


def garbage_cases(rng: random.Random, per_method: int) -> list[GRPCCase]:
    """Bytes that do not parse as the method's request, for every method of every public service
    (the same descriptors the router registers)."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    services = [*public_pb2.DESCRIPTOR.services_by_name.values(), health_pb2.DESCRIPTOR.services_by_name["Health"],
                reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]
    cases = []
    for service in services:
        for method in service.methods:
            if method.client_streaming:
                continue  # reflection's stream: sent by test_hostile_input itself
            cls = message_factory.GetMessageClass(method.input_type)
            made = 0
            while made < per_method:
                payload = _garbage(rng)
                try:
                    cls.FromString(payload)
                    continue  # it parses: not garbage to this method
                except DecodeError:
                    pass
                cases.append(GRPCCase("garbage bytes", f"/{service.full_name}/{method.name}", payload, method.server_streaming, method.input_type.full_name))
                made += 1
    return cases


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 300))
    if kind == 1:  # a string field holding invalid UTF-8
        bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])
        return bytes([(rng.randrange(1, 8) << 3) | 2, len(bad)]) + bad
    if kind == 2:  # a length prefix beyond the end
        return bytes([(rng.randrange(1, 8) << 3) | 2, rng.randrange(10, 127)]) + rng.randbytes(rng.randrange(0, 9))
    if kind == 3:  # a varint that never ends
        return bytes([rng.randrange(1, 8) << 3]) + b"\xff" * rng.randrange(10, 20)
    return bytes([0]) + rng.randbytes(rng.randrange(0, 30))  # field number 0
