from __future__ import annotations

import pytest

from splitserve.engine.block_pool import ROOT_HASH, BlockPool, block_hashes, hash_block


def test_allocate_and_free_return_every_block() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    a = pool.allocate(5)
    assert a is not None and len(set(a)) == 5
    assert pool.num_free == 3
    assert pool.allocate(4) is None  # all-or-nothing
    assert pool.num_free == 3
    pool.free(a)
    assert pool.num_free == 8 and pool.num_used == 0


def test_double_free_is_an_error() -> None:
    pool = BlockPool(4, 4)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([b])


def test_hashes_chain_and_are_stable() -> None:
    tokens = list(range(10))
    hashes = block_hashes(tokens, 4)
    assert len(hashes) == 2  # only full blocks
    assert hashes[0] == hash_block(ROOT_HASH, [0, 1, 2, 3])
    assert hashes[1] == hash_block(hashes[0], [4, 5, 6, 7])
    # same tokens after a different first block -> different hash for block 2
    assert block_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4)[1] != hashes[1]
    # extending keeps the known prefix
    assert block_hashes(tokens + [10, 11], 4, hashes) == block_hashes(tokens + [10, 11], 4)
    # hashes do not depend on the process (sha256, not the salted builtin hash)
    assert hash_block(ROOT_HASH, [1, 2, 3]) == 0xD22AF8F10032E0A1


def test_prefix_hit_shares_blocks_and_counts_refs() -> None:
    pool = BlockPool(8, 4)
    blocks = pool.allocate(2)
    hashes = block_hashes(list(range(8)), 4)
    for b, h in zip(blocks, hashes):
        pool.cache(b, h)
    assert pool.touch(hashes) == blocks
    assert [pool.ref_count(b) for b in blocks] == [2, 2]
    pool.free(blocks)
    pool.free(blocks)
    assert pool.num_free == 8
    # still findable after being freed, until evicted
    assert pool.cached_prefix_length(hashes) == 2


def test_uncached_blocks_are_reused_before_cached_ones_and_lru_evicts_oldest() -> None:
    pool = BlockPool(4, 2)
    first = pool.allocate(2)
    h = block_hashes([1, 2, 3, 4], 2)
    pool.cache(first[0], h[0])
    pool.cache(first[1], h[1])
    pool.free(list(reversed(first)))  # tail first: the prefix head is evicted last
    fresh = pool.allocate(2)
    assert set(fresh).isdisjoint(first)  # the two never-cached blocks went first
    assert pool.num_evictions == 0
    (evicted,) = pool.allocate(1)
    assert evicted == first[1] and pool.num_evictions == 1
    assert pool.cached_prefix_length(h) == 1  # the head survives


def test_reset_prefix_cache_forgets_hashes() -> None:
    pool = BlockPool(2, 2)
    (b,) = pool.allocate(1)
    pool.cache(b, 123)
    pool.free([b])
    pool.reset_prefix_cache()
    assert pool.num_cached == 0 and pool.num_free == 2
