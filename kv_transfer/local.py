"""In-process transport: the sender calls the receiver directly (tests, one-process deployments).

Endpoints are `local://NAME`, resolved through a `LocalHub` shared by the workers of the process.
"""

from __future__ import annotations

import threading

import torch

from splitserve.kv_transfer.errors import PeerUnavailableError
from splitserve.kv_transfer.layout import FirstToken, KVLayout
from splitserve.kv_transfer.receiver import KVReceiver
from splitserve.kv_transfer.sender import KVSender
from splitserve.kv_transfer.wire import PayloadHeader


class LocalHub:
    def __init__(self) -> None:
        self._receivers: dict[str, KVReceiver] = {}
        self._lock = threading.Lock()

    def register(self, receiver: KVReceiver) -> str:
        with self._lock:
            self._receivers[receiver.receiver_id] = receiver
        return f"local://{receiver.receiver_id}"

    def unregister(self, receiver_id: str) -> None:
        with self._lock:
            self._receivers.pop(receiver_id, None)

    def connect(self, endpoint: str, layout: KVLayout) -> "LocalSender":
        name = endpoint.removeprefix("local://")
        with self._lock:
            receiver = self._receivers.get(name)
        if receiver is None:
            raise PeerUnavailableError(f"no in-process KV receiver {name!r}")
        receiver.handshake(layout)
        return LocalSender(receiver)


class LocalSender(KVSender):
    max_payload_bytes = 1 << 30  # no wire: one payload per layer
    def __init__(self, receiver: KVReceiver) -> None:
        self.receiver = receiver

    def send(self, header: PayloadHeader, kv: torch.Tensor) -> None:
        self.receiver.receive(header, lambda dest: dest.copy_(kv))

    def commit(self, request_id: str, secret: str, first: FirstToken, num_tokens: int) -> None:
        self.receiver.commit(request_id, secret, first, num_tokens)

    def abort(self, request_id: str, secret: str, reason: str) -> None:
        self.receiver.abort(request_id, secret, reason)

    def touch(self, request_id: str, secret: str) -> None:
        self.receiver.touch(request_id, secret)
