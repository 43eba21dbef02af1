"""Prefix-cache events through a real Redis: a block pool's events published, a router's index
following them; late starts, gaps, worker restarts, worker departures and a Redis restart."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from splitserve.cluster.kv_events import STREAM_LENGTH, KVEventPublisher, KVEventReader, stream_key
from splitserve.cluster.redis_server import EmbeddedRedis
from splitserve.engine.block_pool import BlockPool, block_hashes
from splitserve.router.prefix_index import PrefixIndex

PREFIX = "splitserve:t:"


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    r = EmbeddedRedis()
    yield r
    r.stop()


class Worker:
    """A real block pool that caches prompts, and its publisher (driven by hand, no thread)."""

    def __init__(self, client: redis.Redis, worker_id: str, num_blocks: int = 64) -> None:
        self.pool = BlockPool(num_blocks, 4, record_events=True)
        self.worker_id = worker_id
        self.pub = KVEventPublisher(client, PREFIX, worker_id, self.source, snapshot_seconds=3600)

    def source(self, snapshot: bool):
        return self.pool.drain_events(), self.pool.cached_hashes() if snapshot else None

    def cache_prompt(self, tokens: list[int]) -> list[int]:
        hashes = block_hashes(tokens, 4)
        blocks = self.pool.allocate(len(hashes))
        for i, (b, h) in enumerate(zip(blocks, hashes)):
            self.pool.cache(b, h, hashes[i - 1] if i else 0, i)
        self.pool.free(blocks)
        return hashes


def reader_for(client: redis.Redis, live: set[str]) -> tuple[KVEventReader, PrefixIndex]:
    index = PrefixIndex()
    return KVEventReader(client, PREFIX, index, lambda: live, block_ms=10), index


def test_events_reach_the_index_and_removals_follow(server) -> None:
    client = redis.Redis.from_url(server.url)
    w = Worker(client, "w1", num_blocks=8)
    reader, index = reader_for(client, {"w1"})
    reader.poll()  # no snapshot yet: follows the stream from its start
    w.pub.publish()  # the epoch's reset batch (nothing cached yet)
    a = w.cache_prompt(list(range(16)))  # 4 blocks
    w.pub.publish()
    reader.poll()
    assert index.match(a) == {"w1": 4} and reader.snapshots_loaded == 0
    b = w.cache_prompt(list(range(100, 120)))  # 5 blocks of 8: evicts the least recently freed, a's first
    w.pub.publish()
    reader.poll()
    assert index.match(b) == {"w1": 5}
    assert w.pool.cached_prefix_length(a) == 0 and index.match(a) == {}
    assert index.blocks_of("w1") == len(w.pool.cached_hashes()) == 8


def test_a_late_router_rebuilds_from_the_snapshot(server) -> None:
    client = redis.Redis.from_url(server.url)
    w = Worker(client, "w1", num_blocks=4096)
    prompts = [w.cache_prompt([i] * 40) for i in range(3)]
    w.pub.publish()
    for i in range(STREAM_LENGTH * 2):  # far more batches than the stream keeps
        w.cache_prompt([1000 + i, 7, 7, 7])
        w.pub.publish()
    w.pub._last_snapshot = float("-inf")  # the next round writes a snapshot
    w.pub.publish()
    assert client.xlen(stream_key(PREFIX, "w1")) < STREAM_LENGTH * 2  # trimmed: replay alone cannot work
    late = w.cache_prompt([5] * 40)
    w.pub.publish()
    reader, index = reader_for(client, {"w1"})
    reader.poll()
    reader.poll()
    assert reader.snapshots_loaded == 1
    for hashes in [*prompts, late]:
        assert index.match(hashes) == {"w1": 10}
    assert index.blocks_of("w1") == len(w.pool.cached_hashes())


def test_a_gap_or_a_restarted_worker_reloads_the_snapshot(server) -> None:
    client = redis.Redis.from_url(server.url)
    w = Worker(client, "w1")
    reader, index = reader_for(client, {"w1"})
    reader.poll()
    first = w.cache_prompt(list(range(8)))
    w.pub.publish()
    reader.poll()
    assert index.match(first) == {"w1": 2}
    # the worker restarts: a new process, an empty cache, a new epoch that begins with a reset
    w2 = Worker(client, "w1")
    second = w2.cache_prompt(list(range(50, 58)))
    w2.pub.publish()
    reader.poll()
    assert index.match(first) == {} and index.match(second) == {"w1": 2} and reader.snapshots_loaded == 0
    # a hole in the sequence (a batch that never arrived) sends the reader to the snapshot
    w2.pub.seq += 1
    w2.cache_prompt(list(range(70, 78)))
    w2.pub._last_snapshot = float("-inf")
    w2.pub.publish()
    reader.poll()  # sees the hole: stale
    reader.poll()  # reloads the snapshot
    assert reader.snapshots_loaded == 1 and index.blocks_of("w1") == len(w2.pool.cached_hashes())


def test_a_worker_that_leaves_leaves_the_index(server) -> None:
    client = redis.Redis.from_url(server.url)
    w1, w2 = Worker(client, "w1"), Worker(client, "w2")
    live = {"w1", "w2"}
    index = PrefixIndex()
    reader = KVEventReader(client, PREFIX, index, lambda: set(live), block_ms=10)
    shared = [w.cache_prompt(list(range(12))) for w in (w1, w2)][0]
    for w in (w1, w2):
        w.pub.publish()
    reader.poll()
    reader.poll()
    assert index.match(shared) == {"w1": 3, "w2": 3}
    live.discard("w2")  # its heartbeat expired
    reader.poll()
    assert index.match(shared) == {"w1": 3} and "w2" not in reader.followed


def test_events_lost_while_redis_restarts_are_recovered(server) -> None:
    client = redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    w = Worker(client, "w1")
    reader, index = reader_for(client, {"w1"})
    before = w.cache_prompt(list(range(8)))
    w.pub.publish()
    reader.poll()
    port = server.port
    server.stop()
    lost = w.cache_prompt(list(range(30, 38)))
    w.pub.publish()  # fails: a new epoch, whose first batch resets the readers' view
    assert w.pub.seq == 0
    server.__init__(port=port, password=server.password)  # same address and password, empty data
    w.pub.publish()
    reader.poll()
    reader.poll()
    assert index.match(before) == {"w1": 2} and index.match(lost) == {"w1": 2}
