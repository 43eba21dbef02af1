"""Exceptions raised by the engine.

Each class carries a canonical status name (`status`) from the gRPC vocabulary. The one place
that turns these into gRPC status codes and HTTP statuses lives at the service edge; the engine
only says *what* went wrong and which field or tensor is to blame.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    status = "INTERNAL"


class InvalidRequestError(EngineError, ValueError):
    """A request (prompt or sampling parameters) is malformed. `field` names the culprit."""

    status = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested output does not fit the model's context window."""


class ModelNotFoundError(InvalidRequestError):
    """A request names a model this deployment does not serve (404, as OpenAI's API answers)."""

    status = "NOT_FOUND"


class CheckpointError(EngineError):
    """A checkpoint folder does not fit the model: `key` names the file, config key or tensor."""

    status = "FAILED_PRECONDITION"

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class UnknownRequestError(EngineError, KeyError):
    """An operation names a request id the engine does not hold."""

    status = "NOT_FOUND"

    def __init__(self, request_id: str) -> None:
        super().__init__(request_id)
        self.request_id = request_id

    def __str__(self) -> str:
        return f"unknown request id {self.request_id!r}"


class DuplicateRequestError(InvalidRequestError):
    """A request id is already in use."""

    def __init__(self, request_id: str) -> None:
        super().__init__("request_id", f"{request_id!r} is already in use")


class KVCapacityError(EngineError):
    """Not enough KV blocks for an operation that cannot wait (e.g. a reservation)."""

    status = "RESOURCE_EXHAUSTED"
