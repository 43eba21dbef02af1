"""One KV pusher per (transport, decode endpoint), connected (with its handshake) on first use
and again after a connection broke; concurrent first requests share one connect."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from splitserve.kv_transfer.connect import connect
from splitserve.kv_transfer.errors import TransferError
from splitserve.kv_transfer.layout import KVLayout, TransferDescriptor
from splitserve.kv_transfer.local import LocalHub
from splitserve.kv_transfer.sender import KVPusher
from splitserve.proto.status import StatusError
from splitserve.proto.tls import TLSFiles


class PushError(StatusError):
    """No connection to a decode worker's KV endpoint."""


class LeaseKeeper:
    """Keeps a queued request's reservation on the decode worker: while the work ahead of it
    moves (`progress()` changes), the request is touched every third of its lease, so waiting
    its turn behind a long prefill is not taken for a stalled worker. Work that stops moving
    touches nothing, and the lease frees the reservation as before."""

    def __init__(self, pusher: KVPusher, request_id: str, descriptor: TransferDescriptor, progress: Callable[[], int]) -> None:
        self.pusher, self.request_id, self.secret, self.progress = pusher, request_id, descriptor.secret, progress
        # a third of what is left of the lease (by the decode host's clock: kept within 0.5..10 s)
        self.every = min(10.0, max(0.5, (descriptor.lease_expiry_unix - time.time()) / 3))
        self.last, self.seen = time.monotonic(), progress()
        self.touches = 0

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.every and (seen := self.progress()) != self.seen:
            self.pusher.touch(self.request_id, self.secret)
            self.last, self.seen = now, seen
            self.touches += 1


class PusherPool:
    def __init__(self, sender_id: str, layout: KVLayout, *, hub: LocalHub | None = None, device: str = "cpu", token: str | None = None,
                 tls: TLSFiles | None = None) -> None:
        self.sender_id = sender_id
        self.layout = layout
        self.hub = hub
        self.device = device
        self.token = token
        self.tls = tls
        self._pushers: dict[tuple[str, str], KVPusher] = {}
        self._connecting: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, d: TransferDescriptor) -> KVPusher:
        key = (d.transport, d.endpoint)
        with self._lock:
            connecting = self._connecting.setdefault(key, threading.Lock())
        with connecting:
            with self._lock:
                pusher = self._pushers.get(key)
            if pusher is not None and pusher.broken is None:
                return pusher
            try:
                sender = connect(d.transport, d.endpoint, self.sender_id, self.layout, hub=self.hub, device=self.device, token=self.token,
                                 tls=self.tls)
            except TransferError as e:
                raise PushError(e.status, f"cannot reach decode worker {d.decode_worker_id} at {d.endpoint} over {d.transport}: {e}") from e
            fresh = KVPusher(sender, f"{d.decode_worker_id}/{d.transport}")
            with self._lock:
                self._pushers[key] = fresh
        if pusher is not None:
            pusher.close()  # broken: nothing of use is queued on it any more
        return fresh

    def close(self) -> None:
        with self._lock:
            pushers = list(self._pushers.values())
            self._pushers.clear()
        for p in pushers:
            p.close()
