"""The receiving end every transport feeds: handshake check, payload checks, writes into the
reserved blocks, commits and aborts, all recorded in the `TransferTable`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from splitserve.kv_transfer.errors import PayloadError, TransferError
from splitserve.kv_transfer.layout import FirstToken, KVLayout
from splitserve.kv_transfer.state import TransferTable
from splitserve.kv_transfer.wire import DTYPES, PayloadHeader

logger = logging.getLogger(__name__)


class KVStore(Protocol):
    """Where received KV goes: the decode worker's paged cache, addressed by block ids."""

    def kv_view(self, layer: int, block_ids: list[int]) -> torch.Tensor | None:
        """A writable view of these blocks of `layer` if they are contiguous, else None."""

    def write_kv(self, layer: int, block_ids: list[int], data: torch.Tensor) -> None:
        """Scatter `data` [n, 2, block_size, KH, D] into the blocks of `layer`."""


Fill = Callable[[torch.Tensor], None]


class KVReceiver:
    def __init__(self, receiver_id: str, layout: KVLayout, table: TransferTable, store: KVStore, device: str = "cpu") -> None:
        self.receiver_id = receiver_id
        self.layout = layout
        self.table = table
        self.store = store
        self.device = device

    def handshake(self, sender_layout: KVLayout) -> None:
        self.layout.check_peer(sender_layout)

    def receive(self, header: PayloadHeader, fill: Fill) -> None:
        """Check `header`, then let `fill` write the payload into its blocks (straight into the
        cache when the blocks are contiguous, else through one staging tensor)."""
        self.table.authorize(header.request_id, header.secret)
        try:
            header.check(self.layout)
        except PayloadError as e:
            self.table.fail(header.request_id, str(e), "INTERNAL")
            raise
        blocks = list(header.block_ids)
        transfer = self.table.begin_payload(header.request_id, header.secret, header.layer, blocks)
        error = None
        try:
            view = self.store.kv_view(header.layer, blocks)
            if view is not None:
                fill(view)
            else:
                staging = torch.empty(header.shape, dtype=DTYPES[header.dtype], device=self.device)
                fill(staging)
                self.store.write_kv(header.layer, blocks, staging)
        except Exception as e:  # any failure to land the bytes fails this transfer
            error = str(e) if isinstance(e, TransferError) else f"{type(e).__name__}: {e}"
            raise
        finally:
            self.table.end_payload(transfer, header.layer, blocks, header.byte_length, error)

    def commit(self, request_id: str, secret: str, first: FirstToken, num_tokens: int) -> None:
        t = self.table.commit(request_id, secret, first, num_tokens)
        if t.state.value != "complete":
            raise TransferError(t.reason, t.status or "INTERNAL")

    def touch(self, request_id: str, secret: str) -> None:
        if self.table.get(request_id) is not None:  # one that already ended has nothing to keep
            self.table.touch(request_id, secret)

    def abort(self, request_id: str, secret: str, reason: str) -> None:
        if self.table.get(request_id) is None:
            return  # already gone (landed, expired, aborted here): nothing to abort
        self.table.authorize(request_id, secret)
        self.table.fail(request_id, f"sender aborted: {reason}")


class TensorKVStore:
    """`KVStore` over a paged cache tensor laid out [layers, num_blocks, 2, block_size, KH, D]."""

    def __init__(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache

    def kv_view(self, layer: int, block_ids: list[int]) -> torch.Tensor | None:
        first = block_ids[0]
        if block_ids != list(range(first, first + len(block_ids))):
            return None
        return self.kv_cache[layer, first : first + len(block_ids)]  # contiguous: blocks are adjacent

    def write_kv(self, layer: int, block_ids: list[int], data: torch.Tensor) -> None:
        index = torch.tensor(block_ids, device=self.kv_cache.device)
        self.kv_cache[layer].index_copy_(0, index, data.to(self.kv_cache.device, self.kv_cache.dtype))
