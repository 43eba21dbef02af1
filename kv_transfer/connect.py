"""Open a sender for a transfer descriptor's transport and endpoint (handshake included)."""

from __future__ import annotations

from splitserve.kv_transfer.errors import TransferError
from splitserve.kv_transfer.layout import KVLayout
from splitserve.kv_transfer.local import LocalHub
from splitserve.kv_transfer.sender import KVSender
from splitserve.proto.tls import TLSFiles

TRANSPORTS = ("torch", "grpc", "local")


def connect(
    transport: str,
    endpoint: str,
    sender_id: str,
    layout: KVLayout,
    *,
    hub: LocalHub | None = None,
    device: str = "cpu",
    timeout: float = 10.0,
    token: str | None = None,
    tls: TLSFiles | None = None,
) -> KVSender:
    """`token` is the cluster token the receiver's gRPC server may require; `tls` the cluster's
    TLS files when its gRPC ports use TLS."""
    if transport == "local":
        if hub is None:
            raise TransferError("transport 'local' needs both workers in one process (no LocalHub here)")
        return hub.connect(endpoint, layout)
    if transport == "grpc":
        from splitserve.kv_transfer.grpc_transport import GrpcSender

        return GrpcSender(endpoint, sender_id, layout, handshake_timeout=timeout, token=token, tls=tls)
    if transport == "torch":
        from splitserve.kv_transfer.torch_transport import TorchSender

        return TorchSender(endpoint, sender_id, layout, device=device, handshake_timeout=timeout, token=token, tls=tls)
    raise TransferError(f"unknown KV transport {transport!r}; expected one of {TRANSPORTS}")
