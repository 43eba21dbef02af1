"""The router's prefix index: longest cached prefix per worker, updates, bounded memory."""

from __future__ import annotations

from splitserve.router.prefix_index import PrefixIndex


def test_longest_prefix_per_worker() -> None:
    idx = PrefixIndex()
    idx.add("a", [1, 2, 3, 4])
    idx.add("b", [1, 2])
    idx.add("c", [9, 2, 3])  # holds later blocks but not the first: no prefix
    assert idx.match([1, 2, 3, 4, 5]) == {"a": 4, "b": 2}
    assert idx.match([1, 7]) == {"a": 1, "b": 1}
    assert idx.match([8]) == {} and idx.match([]) == {}


def test_removal_drop_and_snapshot_reset() -> None:
    idx = PrefixIndex()
    idx.add("a", [1, 2, 3])
    idx.add("b", [1, 2, 3])
    idx.remove("a", [2])
    assert idx.match([1, 2, 3]) == {"a": 1, "b": 3}
    idx.drop_worker("b")
    assert idx.match([1, 2, 3]) == {"a": 1} and idx.workers() == ["a"]
    idx.reset_worker("a", [1, 2])
    assert idx.match([1, 2, 3]) == {"a": 2} and idx.blocks_of("a") == 2
    idx.add("c", [1])  # takes b's freed slot
    assert idx.match([1, 2]) == {"a": 2, "c": 1}
    idx.drop_worker("a")
    idx.drop_worker("c")
    assert len(idx) == 0


def test_memory_is_bounded_and_used_prefixes_stay() -> None:
    idx = PrefixIndex(capacity=100)
    idx.add("a", range(0, 60))
    idx.add("b", range(1000, 1040))
    assert idx.match(list(range(0, 10))) == {"a": 10}  # touches the first ten: most recently used
    idx.add("c", range(2000, 2050))
    assert len(idx) == 100 and idx.evictions == 50
    assert idx.match(list(range(0, 10))) == {"a": 10}  # survived
    assert idx.match([10]) == {} and idx.blocks_of("a") == 10  # the unused rest of a's went first
    assert idx.match(list(range(2000, 2050))) == {"c": 50}
