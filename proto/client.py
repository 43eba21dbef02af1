"""The Python client SDK for a splitserve router's gRPC API, sync and asyncio.

    from splitserve.proto.client import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("Hello", max_tokens=16, temperature=0).text)
        for chunk in c.generate_stream("Hello", max_tokens=16):
            print(chunk.text, end="", flush=True)

Every call has a deadline (`timeout`, default 600 s). Failures raise a subclass of
`SplitserveError` chosen by the gRPC status: InvalidArgumentError (bad input, naming the
field), FailedPreconditionError, UnauthenticatedError, NotFoundError, ResourceExhaustedError, UnavailableError,
DeadlineExceededError, AbortedError, InternalError. Mistakes the SDK can see itself (an option of the
wrong type or range, a prompt that is neither text nor token ids) are InvalidArgumentError naming
the keyword before anything is sent; a call on a closed client is ClientClosedError.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from splitserve.proto import public_pb2, public_pb2_grpc
from splitserve.proto.keepalive import KEEPALIVE


class SplitserveError(Exception):
    status = "UNKNOWN"

    def __init__(self, message: str, request_id: str = "") -> None:
        super().__init__(message)
        self.request_id = request_id


class InvalidArgumentError(SplitserveError):
    status = "INVALID_ARGUMENT"


class FailedPreconditionError(InvalidArgumentError):
    """The cluster cannot serve the request as it is set up (e.g. two workers whose KV layouts
    differ); the message names what differs."""

    status = "FAILED_PRECONDITION"


class UnauthenticatedError(SplitserveError):
    status = "UNAUTHENTICATED"


class PermissionDeniedError(SplitserveError):
    """The key is valid but may not make this call (an API key on the Admin API of a cluster with admin keys)."""

    status = "PERMISSION_DENIED"


class NotFoundError(SplitserveError):
    status = "NOT_FOUND"


class ResourceExhaustedError(SplitserveError):
    status = "RESOURCE_EXHAUSTED"


class UnavailableError(SplitserveError):
    status = "UNAVAILABLE"


class DeadlineExceededError(SplitserveError):
    status = "DEADLINE_EXCEEDED"


class AbortedError(SplitserveError):
    status = "ABORTED"


class InternalError(SplitserveError):
    status = "INTERNAL"


class ClientClosedError(SplitserveError):
    """A call on a client after its `close()` (or the end of its `with` block)."""

    status = "FAILED_PRECONDITION"


_BY_STATUS = {cls.status: cls for cls in (InvalidArgumentError, FailedPreconditionError, UnauthenticatedError, PermissionDeniedError, NotFoundError,
                                          ResourceExhaustedError, UnavailableError, DeadlineExceededError, AbortedError, InternalError)}
_BY_STATUS["CANCELLED"] = AbortedError


def error_from_rpc(e: grpc.RpcError, request_id: str = "") -> SplitserveError:
    code = e.code()
    cls = _BY_STATUS.get(code.name if code else "", SplitserveError)
    err = cls(e.details() or (code.name if code else "error"), request_id)
    err.status = code.name if code else "UNKNOWN"
    return err


@dataclass
class GenerateChunk:
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finished: bool
    finish_reason: str | None
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, with top_logprobs=N


@dataclass
class Completion:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float | str | int] = field(default_factory=dict)


def _request(prompt: str | list[int], *, request_id: str | None = None, model: str = "", max_tokens: int = 16, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
             ignore_eos: bool = False, skip_special_tokens: bool = True, min_tokens: int = 0, logit_bias: dict[int, float] | None = None,
             repetition_penalty: float | None = None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0, top_logprobs: int = 0,
             slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> public_pb2.GenerateRequest:
    """The request for `prompt` (text or token ids) with these sampling options; every
    generate method of both clients takes exactly these keywords. A value of the wrong type or
    range is an InvalidArgumentError naming its keyword, before anything is sent."""
    if not isinstance(prompt, (str, list, tuple)):
        raise InvalidArgumentError(f"prompt: must be text or a list of token ids, got {type(prompt).__name__}")
    if isinstance(max_tokens, int) and max_tokens < 1:  # 0 on the wire means "the default"
        raise InvalidArgumentError(f"max_tokens: must be >= 1, got {max_tokens}")
    fields = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
              "stop": [stop] if isinstance(stop, str) else stop or [], "stop_token_ids": stop_token_ids or [], "ignore_eos": ignore_eos,
              "min_tokens": min_tokens, "logit_bias": logit_bias or {}, "frequency_penalty": frequency_penalty,
              "presence_penalty": presence_penalty, "top_logprobs": top_logprobs}
    fields |= {k: v for k, v in (("repetition_penalty", repetition_penalty), ("seed", seed)) if v is not None}
    if not skip_special_tokens:
        fields["skip_special_tokens"] = False
    params = _message(public_pb2.SamplingParams, fields)
    top = {"request_id": request_id or "", "model": model, "params": params}
    top |= {k: v for k, v in (("slo_ttft_ms", slo_ttft_ms), ("slo_tpot_ms", slo_tpot_ms)) if v is not None}
    top |= {"text": prompt} if isinstance(prompt, str) else {"token_ids": {"ids": list(prompt)}}
    return _message(public_pb2.GenerateRequest, top)


def _message(cls, fields: dict):
    """`cls(**fields)`, or an InvalidArgumentError naming the first field protobuf refuses."""
    try:
        return cls(**fields)
    except (TypeError, ValueError):
        for name, value in fields.items():
            try:
                cls(**{name: value})
            except (TypeError, ValueError) as e:
                shown = "the token ids" if name == "token_ids" else repr(value)
                raise InvalidArgumentError(f"{'prompt' if name == 'token_ids' else name}: {shown} is not valid here ({e})") from None
        raise


def _chunk(msg: public_pb2.GenerateResponse) -> GenerateChunk:
    return GenerateChunk(msg.request_id, list(msg.token_ids), msg.text, list(msg.logprobs), msg.finished, msg.finish_reason or None,
                         _top(msg))


def _top(msg: public_pb2.GenerateResponse) -> list[list[tuple[int, float]]]:
    return [list(zip(t.token_ids, t.logprobs)) for t in msg.top_logprobs]


def _fields(msg) -> dict:
    """A message's fields as plain Python values (int64 stays an int, unlike JSON mapping)."""
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}


def _add(done: Completion, msg: public_pb2.GenerateResponse) -> None:
    done.request_id = msg.request_id
    done.text += msg.text
    done.token_ids.extend(msg.token_ids)
    done.logprobs.extend(msg.logprobs)
    done.top_logprobs.extend(_top(msg))
    if msg.finished:
        done.finish_reason = msg.finish_reason
        done.usage = _fields(msg.usage)
        done.timings = _fields(msg.timings)


def _credentials(tls: bool | str | Path) -> grpc.ChannelCredentials | None:
    """`tls`: False for plaintext, True for TLS checked against the system's CAs, or the path
    of a PEM CA bundle (a cluster's own CA)."""
    if tls is False or tls is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=None if tls is True else Path(tls).read_bytes())


class _Deadlines:
    closed: bool
    timeout: float

    def _deadline(self, timeout: float | None) -> float:
        """A call's deadline: its own `timeout` (0 included) or the client's."""
        if self.closed:
            raise ClientClosedError("this client is closed")
        return self.timeout if timeout is None else timeout


class Client(_Deadlines):
    def __init__(self, address: str, *, api_key: str | None = None, timeout: float = 600.0, tls: bool | str | Path = False) -> None:
        """`tls`: False (plaintext), True (the system's CAs) or a PEM CA file for a router serving TLS."""
        creds = _credentials(tls)
        self.channel = grpc.secure_channel(address, creds, KEEPALIVE) if creds else grpc.insecure_channel(address, KEEPALIVE)
        self.stub = public_pb2_grpc.GenerationStub(self.channel)
        self.admin = public_pb2_grpc.AdminStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout
        self.closed = False

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True
        self.channel.close()

    def generate_stream(self, prompt: str | list[int], *, timeout: float | None = None, **options) -> Iterator[GenerateChunk]:
        """Stream the completion of `prompt`; `options` are `_request`'s keywords (max_tokens,
        temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos, skip_special_tokens, ...)."""
        req = _request(prompt, **options)
        call = self.stub.Generate(req, timeout=self._deadline(timeout), metadata=self.metadata)
        try:
            for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as e:
            raise error_from_rpc(e, req.request_id) from None
        finally:
            call.cancel()  # leaving early aborts the request on the server

    def generate(self, prompt: str | list[int], *, timeout: float | None = None, **options) -> Completion:
        """The whole completion of `prompt`, with usage and the request's timing breakdown."""
        req = _request(prompt, **options)
        done = Completion(req.request_id)
        try:
            for msg in self.stub.Generate(req, timeout=self._deadline(timeout), metadata=self.metadata):
                _add(done, msg)
        except grpc.RpcError as e:
            raise error_from_rpc(e, req.request_id) from None
        return done

    def abort(self, request_id: str) -> bool:
        return self._call(self.stub.Abort, public_pb2.AbortRequest(request_id=request_id)).found

    def timings(self, request_id: str) -> public_pb2.Timings:
        return self._call(self.stub.GetTimings, public_pb2.TimingsRequest(request_id=request_id))

    # ---- administration ------------------------------------------------------------------
    def status(self) -> public_pb2.ClusterStatus:
        return self._call(self.admin.Status, public_pb2.StatusRequest())

    def scale(self, prefill: int | None = None, decode: int | None = None) -> public_pb2.ClusterStatus:
        req = public_pb2.ScaleRequest()
        if prefill is not None:
            req.prefill = prefill
        if decode is not None:
            req.decode = decode
        return self._call(self.admin.Scale, req)

    def drain(self, worker_id: str) -> bool:
        return self._call(self.admin.Drain, public_pb2.DrainRequest(worker_id=worker_id)).found

    def shutdown(self) -> None:
        self._call(self.admin.Shutdown, public_pb2.ShutdownRequest())

    def _call(self, method, request, timeout: float = 30.0):
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self.metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None


class AsyncClient(_Deadlines):
    """The asyncio twin of `Client` for generation."""

    def __init__(self, address: str, *, api_key: str | None = None, timeout: float = 600.0, tls: bool | str | Path = False) -> None:
        creds = _credentials(tls)
        self.channel = grpc.aio.secure_channel(address, creds, KEEPALIVE) if creds else grpc.aio.insecure_channel(address, KEEPALIVE)
        self.stub = public_pb2_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout
        self.closed = False

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.closed = True
        await self.channel.close()

    async def generate_stream(self, prompt: str | list[int], *, timeout: float | None = None, **options) -> AsyncIterator[GenerateChunk]:
        req = _request(prompt, **options)
        call = self.stub.Generate(req, timeout=self._deadline(timeout), metadata=self.metadata)
        try:
            async for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as e:
            raise error_from_rpc(e, req.request_id) from None
        finally:
            call.cancel()

    async def abort(self, request_id: str) -> bool:
        return (await self._call(self.stub.Abort, public_pb2.AbortRequest(request_id=request_id))).found

    async def timings(self, request_id: str) -> public_pb2.Timings:
        return await self._call(self.stub.GetTimings, public_pb2.TimingsRequest(request_id=request_id))

    async def _call(self, method, request, timeout: float = 30.0):
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self.metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    async def generate(self, prompt: str | list[int], *, timeout: float | None = None, **options) -> Completion:
        req = _request(prompt, **options)
        done = Completion(req.request_id)
        try:
            async for msg in self.stub.Generate(req, timeout=self._deadline(timeout), metadata=self.metadata):
                _add(done, msg)
        except grpc.RpcError as e:
            raise error_from_rpc(e, req.request_id) from None
        return done
