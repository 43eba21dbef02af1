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
from pathlib import Path
from typing import Any

# Run from a checkout that was never installed (a copy of the working tree on a GPU machine,
# say), the subpackages are this folder's siblings: `splitserve.engine` is ../engine. Installed,
# they are found where the install put them first, and this adds nothing.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "engine" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))

_SDK = ("Client", "AsyncClient", "Completion", "GenerateChunk", "SplitserveError", "InvalidArgumentError", "FailedPreconditionError", "UnauthenticatedError", "PermissionDeniedError",
        "NotFoundError", "ResourceExhaustedError", "UnavailableError", "DeadlineExceededError", "AbortedError", "InternalError", "ClientClosedError")
__all__ = list(_SDK)


def __getattr__(name: str) -> Any:  # imported on first use: `import splitserve.engine` stays cheap
    if name in _SDK:
        return getattr(import_module("splitserve.proto.client"), name)
    raise AttributeError(f"module 'splitserve' has no attribute {name!r}")
