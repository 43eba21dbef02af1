"""Routing policies on hand-made snapshots: plain data in, a pair out."""

from __future__ import annotations

from collections import Counter

import pytest

from splitserve.router.policy import (
    LeastLoaded,
    NoWorkerError,
    RoundRobin,
    RouteRequest,
    Snapshot,
    WorkerLoad,
    make_policy,
)


def w(wid: str, role: str, **load) -> WorkerLoad:
    return WorkerLoad(wid, role, f"addr-{wid}", **load)


REQ = RouteRequest("r", num_prompt_tokens=100, max_tokens=10)


def test_round_robin_cycles_both_pools() -> None:
    snap = Snapshot((w("p1", "prefill"), w("p2", "prefill")), (w("d1", "decode"), w("d2", "decode"), w("d3", "decode")))
    policy = RoundRobin()
    picks = [tuple(x.worker_id for x in policy.choose(snap, REQ)) for _ in range(6)]
    assert Counter(p for p, _ in picks) == {"p1": 3, "p2": 3}
    assert Counter(d for _, d in picks) == {"d1": 2, "d2": 2, "d3": 2}


def test_least_loaded_prefers_short_queues_and_free_decoders() -> None:
    snap = Snapshot(
        (w("p1", "prefill", queued_prefill_tokens=5000), w("p2", "prefill", queued_prefill_tokens=10)),
        (w("d1", "decode", used_blocks=900), w("d2", "decode", used_blocks=20, reserved_blocks=5)),
    )
    p, d = LeastLoaded().choose(snap, REQ)
    assert (p.worker_id, d.worker_id) == ("p2", "d2")


def test_least_loaded_counts_this_routers_inflight_first() -> None:
    # the heartbeat says d2 is emptier, but this router just sent it three requests
    snap = Snapshot((w("p1", "prefill"),), (w("d1", "decode", used_blocks=50), w("d2", "decode", used_blocks=10, inflight=3)))
    assert LeastLoaded().choose(snap, REQ)[1].worker_id == "d1"


def test_ties_are_shared() -> None:
    snap = Snapshot((w("p1", "prefill"), w("p2", "prefill")), (w("d1", "decode"), w("d2", "decode")))
    policy = LeastLoaded()
    assert {policy.choose(snap, REQ)[1].worker_id for _ in range(4)} == {"d1", "d2"}


def test_excluded_workers_and_empty_pools() -> None:
    snap = Snapshot((w("p1", "prefill"), w("p2", "prefill")), (w("d1", "decode"),))
    retry = RouteRequest("r", 100, 10, frozenset({"p1"}))
    assert all(LeastLoaded().choose(snap, retry)[0].worker_id == "p2" for _ in range(3))
    with pytest.raises(NoWorkerError, match="decode"):
        RoundRobin().choose(Snapshot(snap.prefill, ()), REQ)
    with pytest.raises(NoWorkerError, match="prefill"):
        LeastLoaded().choose(snap, RouteRequest("r", 1, 1, frozenset({"p1", "p2"})))
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")
