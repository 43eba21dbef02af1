"""The paged KV cache's block accounting: plain Python over ints, no tensors.

Life cycle of a block:
    free (uncached) --allocate--> in use (ref >= 1) --free, ref hits 0--> free
    in use --cache(hash)--> in use + cached: findable by its content hash
    free + cached --lookup hit--> in use again (prefix reuse, ref += 1)
    free + cached --allocate, nothing uncached left--> evicted (hash forgotten), in use

Free blocks wait in two queues: never-cached ones are handed out first, then cached ones in
least-recently-freed order, so a prefix stays reusable as long as memory allows.

Block hashes chain: hash(block i) = H(hash(block i-1), token ids of block i). They are stable
across processes (sha256, not Python's salted `hash`) so workers can publish them and a router
can compute the same values for a prompt.

With `record_events`, every hash that becomes findable (stored) or stops being findable
(removed: evicted, or the cache reset) is recorded as a `KVEvent`, in order, for the worker to
publish (`drain_events`); `cached_hashes` is the whole current set, for snapshots.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

ROOT_HASH = 0


@dataclass(frozen=True)
class KVEvent:
    kind: str  # "stored" | "removed"
    block_hash: int
    parent_hash: int = ROOT_HASH  # stored: the hash of the block before it (ROOT_HASH for the first)
    position: int = 0  # stored: the block's index in its sequence


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Content hash of one full block, chained to the hash of the block before it."""
    h = hashlib.sha256(struct.pack("<Q", parent_hash))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest()[:8], "little")


def block_hashes(token_ids: Sequence[int], block_size: int, start: list[int] | None = None) -> list[int]:
    """Chained hashes of every *full* block of `token_ids`; extends `start` (already-known hashes)."""
    hashes = list(start or [])
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


class BlockPool:
    """Ref-counted fixed-size KV blocks with a content-hash index for prefix caching."""

    def __init__(self, num_blocks: int, block_size: int, record_events: bool = False) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block id -> content hash
        self._by_hash: dict[int, int] = {}  # content hash -> block id
        self._free_uncached: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU first
        self.num_evictions = 0
        self.record_events = record_events
        self._events: list[KVEvent] = []

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached-but-unused ones included)."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def cached_prefix_length(self, hashes: Sequence[int]) -> int:
        """Number of leading blocks of `hashes` that are in the cache (does not touch them)."""
        n = 0
        for h in hashes:
            if h not in self._by_hash:
                break
            n += 1
        return n

    # ---- allocation ----------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """Hand out `n` blocks with ref 1, or None (and no change) if fewer are free."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if self._free_uncached:
                block, _ = self._free_uncached.popitem(last=False)
            else:
                block, _ = self._free_cached.popitem(last=False)
                evicted = self._hash_of.pop(block)
                del self._by_hash[evicted]
                self.num_evictions += 1
                if self.record_events:
                    self._events.append(KVEvent("removed", evicted))
            self._ref[block] = 1
            out.append(block)
        return out

    def touch(self, hashes: Sequence[int]) -> list[int]:
        """Take a reference on the cached blocks of the longest cached prefix of `hashes`."""
        out = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            if self._ref[block] == 0:
                del self._free_cached[block]
            self._ref[block] += 1
            out.append(block)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block. Blocks freed last are evicted last, so callers
        free a request's blocks tail first to keep the head of a shared prefix longest."""
        for block in block_ids:
            ref = self._ref[block]
            if ref <= 0:
                raise RuntimeError(f"double free of KV block {block}")
            self._ref[block] = ref - 1
            if ref == 1:
                queue = self._free_cached if block in self._hash_of else self._free_uncached
                queue[block] = None

    def cache(self, block_id: int, block_hash: int, parent_hash: int = ROOT_HASH, position: int = 0) -> None:
        """Make a full, computed block findable by its content hash (first writer wins)."""
        if block_id in self._hash_of or block_hash in self._by_hash:
            return
        self._hash_of[block_id] = block_hash
        self._by_hash[block_hash] = block_id
        if self.record_events:
            self._events.append(KVEvent("stored", block_hash, parent_hash, position))

    def drain_events(self) -> list[KVEvent]:
        """The events recorded since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def cached_hashes(self) -> list[int]:
        return list(self._by_hash)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after weights change)."""
        if self.record_events:
            self._events += [KVEvent("removed", h) for h in self._by_hash]
        for block in list(self._free_cached):
            self._free_uncached[block] = None
        self._free_cached.clear()
        self._hash_of.clear()
        self._by_hash.clear()
