"""Prefix-cache events through Redis: every worker publishes which KV blocks it caches, every
router follows them into its prefix index.

Keys, under `splitserve:{cluster}:`:
    kv:{worker_id}       a stream of event batches, trimmed to about STREAM_LENGTH entries; each
                         entry has `epoch` (the publisher's incarnation), `seq` (1, 2, ... within
                         the epoch) and `events` (JSON [[kind, hash, parent, position], ...],
                         kind "s" stored / "r" removed); the first batch of an epoch also has
                         `reset`: the whole cached set (packed like a snapshot's hashes)
    kvsnap:{worker_id}   the worker's whole cached set as of one batch: JSON {epoch, seq, entry
                         (the stream id of that batch, "0-0" before any), hashes (hex of packed
                         little-endian uint64)}, rewritten every `snapshot_seconds`, with a TTL

An epoch begins with a reset batch, so a reader that follows it from there needs nothing else: a
worker process starts a new epoch, and so does a publisher that failed to write (its events are
lost: the reset after it says what is true). A reader loads a worker's snapshot when it first
sees the worker, or when a batch's seq is not the one after the last it applied (the stream was
trimmed past it, Redis restarted) and it is not a reset; then it follows the stream from the
snapshot's entry: a router that starts, or misses events, has an exact view again after one
snapshot read. A worker that leaves the registry leaves the index.
Block hashes are the engine's chained sha256 hashes: the same on every process and machine.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import redis

from splitserve.engine.block_pool import KVEvent

logger = logging.getLogger(__name__)
STREAM_LENGTH = 2000
SNAPSHOT_TTL_SECONDS = 120


def stream_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}kv:{worker_id}"


def snapshot_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}kvsnap:{worker_id}"


def pack_hashes(hashes: list[int]) -> str:
    return np.asarray(hashes, dtype=np.uint64).astype("<u8").tobytes().hex()


def unpack_hashes(text: str) -> list[int]:
    return np.frombuffer(bytes.fromhex(text), dtype="<u8").tolist()


class KVEventPublisher:
    """A worker's side: every `period` seconds, publish the events its block pool recorded,
    and every `snapshot_seconds` its whole cached set. `source(snapshot)` runs on the worker's
    engine thread and returns (events since the last call, the cached hashes or None)."""

    def __init__(self, client: redis.Redis, prefix: str, worker_id: str, source: Callable[[bool], tuple[list[KVEvent], list[int] | None]],
                 *, period: float = 0.2, snapshot_seconds: float = 2.0) -> None:
        self.client, self.worker_id, self.source = client, worker_id, source
        self.stream, self.snapshot = stream_key(prefix, worker_id), snapshot_key(prefix, worker_id)
        self.period, self.snapshot_seconds = period, snapshot_seconds
        self.epoch, self.seq, self.entry = uuid.uuid4().hex[:12], 0, "0-0"
        self._last_snapshot = float("-inf")  # none yet (the first batch carries the whole set anyway)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{worker_id}", daemon=True)

    def start(self) -> None:
        self.publish()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.publish()

    def publish(self) -> None:
        reset = self.seq == 0  # the epoch's first batch carries the whole set
        due = reset or time.monotonic() - self._last_snapshot >= self.snapshot_seconds
        try:
            events, hashes = self.source(due)
        except Exception as e:  # the engine is gone (stopping, crashed): nothing to say
            logger.debug("no KV events from %s: %s", self.worker_id, e)
            return
        try:
            if events or reset:
                fields = {"epoch": self.epoch, "seq": self.seq + 1,
                          "events": json.dumps([[ev.kind[0], ev.block_hash, ev.parent_hash, ev.position] for ev in events])}
                if reset:
                    fields = {**fields, "reset": pack_hashes(hashes), "events": "[]"}  # the set already includes the events
                self.entry = self.client.xadd(self.stream, fields, maxlen=STREAM_LENGTH, approximate=True).decode()
                self.seq += 1
            if hashes is not None:
                body = {"epoch": self.epoch, "seq": self.seq, "entry": self.entry, "hashes": pack_hashes(hashes)}
                self.client.set(self.snapshot, json.dumps(body), ex=SNAPSHOT_TTL_SECONDS)
                self._last_snapshot = time.monotonic()
        except redis.RedisError as e:
            # the events are lost: a new epoch, whose reset batch says what is cached
            logger.warning("KV events of %s not published (%s); starting a new epoch", self.worker_id, e)
            self.epoch, self.seq, self.entry = uuid.uuid4().hex[:12], 0, "0-0"

    def forget(self) -> None:
        self.client.delete(self.stream, self.snapshot)


@dataclass
class _Followed:
    epoch: str | None = None  # None: no snapshot yet (wait for the epoch's reset batch)
    seq: int = 0
    entry: str = "0-0"
    stale: bool = False  # a gap or an epoch change: reload the snapshot before applying more


class KVEventReader:
    """A router's side: follows the streams of the workers `live()` names into `index`."""

    def __init__(self, client: redis.Redis, prefix: str, index, live: Callable[[], set[str]], *, block_ms: int = 200) -> None:
        self.client, self.prefix, self.index, self.live = client, prefix, index, live
        self.block_ms = block_ms
        self.followed: dict[str, _Followed] = {}
        self.snapshots_loaded = 0
        self.events_applied = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-event-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except redis.RedisError as e:  # Redis away: keep the index as it is, try again
                logger.debug("KV event read failed: %s", e)
                self._stop.wait(1.0)

    def poll(self) -> None:
        """One round: follow the registry's workers, apply what their streams have."""
        live = self.live()
        for w in [w for w in self.followed if w not in live]:
            del self.followed[w]
            self.index.drop_worker(w)
        for w in live:
            f = self.followed.get(w)
            if f is None or f.stale:
                self.followed[w] = self._load_snapshot(w)
        if not self.followed:
            self._stop.wait(self.block_ms / 1000)
            return
        streams = {stream_key(self.prefix, w): f.entry for w, f in self.followed.items()}
        for key, entries in self.client.xread(streams, count=1000, block=self.block_ms) or []:
            worker = key.decode()[len(self.prefix) + 3:]
            f = self.followed.get(worker)
            if f is None:
                continue
            for entry_id, fields in entries:
                if f.stale:
                    break
                self._apply(worker, f, entry_id.decode(), fields)

    def _apply(self, worker: str, f: _Followed, entry: str, fields: dict) -> None:
        epoch, seq = fields[b"epoch"].decode(), int(fields[b"seq"])
        if b"reset" in fields and seq == 1:  # a new epoch says everything: nothing before it matters
            self.index.reset_worker(worker, unpack_hashes(fields[b"reset"].decode()))
            f.epoch, f.seq, f.entry = epoch, seq, entry
            return
        if epoch != f.epoch or seq != f.seq + 1:
            f.stale = True  # a hole: the snapshot tells the truth
            return
        run_kind, run = "s", []
        for kind, h, _parent, _pos in json.loads(fields[b"events"]):  # runs of one kind, in order
            if kind != run_kind:
                self._flush(worker, run_kind, run)
                run_kind, run = kind, []
            run.append(h)
        self._flush(worker, run_kind, run)
        f.seq, f.entry = seq, entry
        self.events_applied += 1

    def _flush(self, worker: str, kind: str, hashes: list[int]) -> None:
        if hashes:
            (self.index.add if kind == "s" else self.index.remove)(worker, hashes)

    def _load_snapshot(self, worker: str) -> _Followed:
        raw = self.client.get(snapshot_key(self.prefix, worker))
        if raw is None:  # none yet: start from the stream's beginning, expecting seq 1
            self.index.drop_worker(worker)
            return _Followed()
        snap = json.loads(raw)
        self.index.reset_worker(worker, unpack_hashes(snap["hashes"]))
        self.snapshots_loaded += 1
        return _Followed(snap["epoch"], snap["seq"], snap["entry"])
