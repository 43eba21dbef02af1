"""The router's index of which worker caches which KV block: plain Python, no I/O.

Block hash -> the set of workers holding that block, as a bitmask over small worker slots, in
least-recently-used order. `match` answers "how many leading blocks of this prompt does each
worker hold" in time proportional to the prompt's blocks (and to the workers that hold its
first block), not to the cluster. Memory is bounded: past `capacity` hashes, the least
recently used ones are forgotten (routing then treats those blocks as uncached: a worse
choice, never a wrong answer, since workers check their own caches).

Thread-safe: the event reader writes from its thread while routing reads on the event loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class PrefixIndex:
    def __init__(self, capacity: int = 1_000_000) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.capacity = capacity
        self._holders: OrderedDict[int, int] = OrderedDict()  # block hash -> worker bitmask; LRU first
        self._slot: dict[str, int] = {}
        self._workers: list[str | None] = []
        self._hashes: list[set[int]] = []  # per slot: the hashes it holds (to drop a worker fast)
        self._free_slots: list[int] = []
        self._lock = threading.Lock()
        self.evictions = 0

    # ---- updates ---------------------------------------------------------------------------
    def add(self, worker: str, hashes: Iterable[int]) -> None:
        with self._lock:
            slot = self._slot_of(worker)
            bit, mine, holders = 1 << slot, self._hashes[slot], self._holders
            for h in hashes:
                holders[h] = holders.get(h, 0) | bit
                holders.move_to_end(h)
                mine.add(h)
            while len(holders) > self.capacity:
                h, mask = holders.popitem(last=False)
                self.evictions += 1
                for s in _bits(mask):
                    self._hashes[s].discard(h)

    def remove(self, worker: str, hashes: Iterable[int]) -> None:
        with self._lock:
            slot = self._slot.get(worker)
            if slot is not None:
                self._remove(slot, hashes)

    def reset_worker(self, worker: str, hashes: Iterable[int]) -> None:
        """Replace what the index believes `worker` holds (a snapshot)."""
        self.drop_worker(worker)
        self.add(worker, hashes)

    def drop_worker(self, worker: str) -> None:
        with self._lock:
            slot = self._slot.pop(worker, None)
            if slot is None:
                return
            self._remove(slot, list(self._hashes[slot]))
            self._workers[slot] = None
            self._free_slots.append(slot)

    def _remove(self, slot: int, hashes: Iterable[int]) -> None:
        keep, mine, holders = ~(1 << slot), self._hashes[slot], self._holders
        for h in hashes:
            mask = holders.get(h)
            if mask is None:
                continue
            mask &= keep
            if mask:
                holders[h] = mask
            else:
                del holders[h]
            mine.discard(h)

    def _slot_of(self, worker: str) -> int:
        slot = self._slot.get(worker)
        if slot is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self._workers[slot] = worker
            else:
                slot = len(self._workers)
                self._workers.append(worker)
                self._hashes.append(set())
            self._slot[worker] = slot
        return slot

    # ---- queries ---------------------------------------------------------------------------
    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """worker -> number of leading blocks of `block_hashes` it holds (workers with none left out)."""
        out: dict[str, int] = {}
        with self._lock:
            holders, workers = self._holders, self._workers
            active = holders.get(block_hashes[0], 0) if block_hashes else 0
            for i, h in enumerate(block_hashes):
                if not active:
                    break
                mask = holders.get(h, 0) & active
                for s in _bits(active & ~mask):  # these workers' prefixes end before block i
                    if i:
                        out[workers[s]] = i
                active = mask
                if mask:
                    holders.move_to_end(h)  # a used prefix stays longest
            for s in _bits(active):
                out[workers[s]] = len(block_hashes)
        return out

    def workers(self) -> list[str]:
        with self._lock:
            return list(self._slot)

    def blocks_of(self, worker: str) -> int:
        with self._lock:
            slot = self._slot.get(worker)
            return 0 if slot is None else len(self._hashes[slot])

    def __len__(self) -> int:
        return len(self._holders)
