"""splitserve: disaggregated prefill/decode LLM serving.

The repository keeps one folder per process (`engine/`, `router/`, `prefill_worker/`, ...);
installed, they live under this one namespace: `splitserve.engine`, `splitserve.router`, ...

The client SDK has a short path and needs only grpcio and protobuf:

    from splitserve import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("Hello", max_tokens=16, temperature=0).text)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_SDK = ("Client", "AsyncClient", "Completion", "GenerateChunk", "SplitserveError", "InvalidArgumentError", "FailedPreconditionError", "UnauthenticatedError",
        "NotFoundError", "ResourceExhaustedError", "UnavailableError", "DeadlineExceededError", "AbortedError", "InternalError")
__all__ = list(_SDK)


def __getattr__(name: str) -> Any:  # imported on first use: `import splitserve.engine` stays cheap
    if name in _SDK:
        return getattr(import_module("splitserve.proto.client"), name)
    raise AttributeError(f"module 'splitserve' has no attribute {name!r}")
