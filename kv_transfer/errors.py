"""Transfer errors. `status` is the canonical gRPC status name the service edge maps."""

from __future__ import annotations


class TransferError(Exception):
    status = "INTERNAL"

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class TransferClosedError(TransferError):
    """The transfer already ended (aborted, failed or expired): late payloads are refused."""

    status = "ABORTED"


class HandshakeError(TransferError):
    """The peers' KV layouts differ; `field` names the first field that does."""

    status = "FAILED_PRECONDITION"

    def __init__(self, field: str, mine: object, theirs: object) -> None:
        super().__init__(f"KV handshake refused: {field} differs (receiver {mine!r}, sender {theirs!r})")
        self.field = field


class PayloadError(TransferError):
    """A payload failed its checks (size, shape, dtype, block ids); the transfer is failed."""

    status = "INVALID_ARGUMENT"


class TransferNotFoundError(TransferError):
    status = "NOT_FOUND"


class WrongSecretError(TransferError):
    """A payload, commit or abort without the reservation's one-time secret: refused, and the
    reservation stays as it was (whoever sent it cannot spoil another request's KV)."""

    status = "PERMISSION_DENIED"


class PeerUnavailableError(TransferError):
    """The other side cannot be reached or went away mid-transfer."""

    status = "UNAVAILABLE"


class HandshakeRefusedError(TransferError):
    """The sender's view of a refused handshake: the receiver's message names the field."""

    status = "FAILED_PRECONDITION"


# What a request reports when its KV transfer failed. Wire-level verdicts such as a malformed
# payload (INVALID_ARGUMENT between two workers) are internal faults to the request's client,
# who sent nothing wrong; unreachable peers stay UNAVAILABLE so the router may retry elsewhere.
_PASSED_THROUGH = {"UNAVAILABLE", "ABORTED", "FAILED_PRECONDITION", "DEADLINE_EXCEEDED"}


def request_status(err: BaseException) -> str:
    status = getattr(err, "status", "INTERNAL")
    return status if status in _PASSED_THROUGH else "INTERNAL"
