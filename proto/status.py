"""The one place errors become gRPC status codes and HTTP statuses.

Every error splitserve raises on purpose carries `status`, a canonical gRPC status name
(e.g. "INVALID_ARGUMENT"). Services call `grpc_code` / `http_status` on it; clients call
`status_name` on a received code to raise the matching typed exception.
"""

from __future__ import annotations

import grpc

# canonical name -> (gRPC code, HTTP status)
STATUSES: dict[str, tuple[grpc.StatusCode, int]] = {
    "INVALID_ARGUMENT": (grpc.StatusCode.INVALID_ARGUMENT, 400),
    "FAILED_PRECONDITION": (grpc.StatusCode.FAILED_PRECONDITION, 400),
    "OUT_OF_RANGE": (grpc.StatusCode.OUT_OF_RANGE, 400),
    "UNAUTHENTICATED": (grpc.StatusCode.UNAUTHENTICATED, 401),
    "PERMISSION_DENIED": (grpc.StatusCode.PERMISSION_DENIED, 403),
    "NOT_FOUND": (grpc.StatusCode.NOT_FOUND, 404),
    "ALREADY_EXISTS": (grpc.StatusCode.ALREADY_EXISTS, 409),
    "ABORTED": (grpc.StatusCode.ABORTED, 409),
    "RESOURCE_EXHAUSTED": (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    "CANCELLED": (grpc.StatusCode.CANCELLED, 499),
    "INTERNAL": (grpc.StatusCode.INTERNAL, 500),
    "DATA_LOSS": (grpc.StatusCode.DATA_LOSS, 500),
    "UNIMPLEMENTED": (grpc.StatusCode.UNIMPLEMENTED, 501),
    "UNAVAILABLE": (grpc.StatusCode.UNAVAILABLE, 503),
    "DEADLINE_EXCEEDED": (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
}

# Trailing metadata of a prefill that failed because the decode worker its KV went to is gone or
# unreachable: the router then counts it against the decode leg (retried on another decode
# worker with the same prefill worker), not against the healthy prefill worker.
RECEIVER_LOST = "x-splitserve-kv-receiver-lost"


def status_of(exc: BaseException) -> str:
    name = getattr(exc, "status", "INTERNAL")
    return name if name in STATUSES else "INTERNAL"


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    return STATUSES[status_of(exc)][0]


def http_status(exc: BaseException) -> int:
    return STATUSES[status_of(exc)][1]


def status_name(code: grpc.StatusCode) -> str:
    return code.name


class StatusError(Exception):
    """An error that is only a status and a message (e.g. relayed from a remote call)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status if status in STATUSES else "INTERNAL"

    @classmethod
    def from_rpc(cls, e: grpc.RpcError, what: str = "") -> "StatusError":
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        detail = e.details() if hasattr(e, "details") else str(e)
        name = code.name if code is not None else "UNKNOWN"
        return cls(name, f"{what}: {detail}" if what else (detail or name))
