"""Routing policies on hand-made snapshots: plain data in, a route out."""

from __future__ import annotations

import math
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
    picks = [(r.prefill.worker_id, r.decode.worker_id) for r in (policy.choose(snap, REQ) for _ in range(6))]
    assert Counter(p for p, _ in picks) == {"p1": 3, "p2": 3}
    assert Counter(d for _, d in picks) == {"d1": 2, "d2": 2, "d3": 2}


def test_least_loaded_prefers_short_queues_and_free_decoders() -> None:
    snap = Snapshot(
        (w("p1", "prefill", queued_prefill_tokens=5000), w("p2", "prefill", queued_prefill_tokens=10)),
        (w("d1", "decode", used_blocks=900), w("d2", "decode", used_blocks=20, reserved_blocks=5)),
    )
    r = LeastLoaded().choose(snap, REQ)
    assert (r.prefill.worker_id, r.decode.worker_id) == ("p2", "d2") and r.path == "disaggregated"


def test_least_loaded_counts_this_routers_inflight_first() -> None:
    # the heartbeat says d2 is emptier, but this router just sent it three requests
    snap = Snapshot((w("p1", "prefill"),), (w("d1", "decode", used_blocks=50), w("d2", "decode", used_blocks=10, inflight=3)))
    assert LeastLoaded().choose(snap, REQ).decode.worker_id == "d1"


def test_ties_are_shared() -> None:
    snap = Snapshot((w("p1", "prefill"), w("p2", "prefill")), (w("d1", "decode"), w("d2", "decode")))
    policy = LeastLoaded()
    assert {policy.choose(snap, REQ).decode.worker_id for _ in range(4)} == {"d1", "d2"}


def test_excluded_workers_and_empty_pools() -> None:
    snap = Snapshot((w("p1", "prefill"), w("p2", "prefill")), (w("d1", "decode"),))
    retry = RouteRequest("r", 100, 10, frozenset({"p1"}))
    assert all(LeastLoaded().choose(snap, retry).prefill.worker_id == "p2" for _ in range(3))
    with pytest.raises(NoWorkerError, match="decode"):
        RoundRobin().choose(Snapshot(snap.prefill, ()), REQ)
    with pytest.raises(NoWorkerError, match="prefill"):
        LeastLoaded().choose(snap, RouteRequest("r", 1, 1, frozenset({"p1", "p2"})))
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")


# ---- workload_aware ------------------------------------------------------------------------
class FakeIndex:
    """worker -> number of leading blocks it holds of any prompt (the index's answer)."""

    def __init__(self, held: dict[str, int]) -> None:
        self.held = held

    def match(self, block_hashes) -> dict[str, int]:
        return {w: min(n, len(block_hashes)) for w, n in self.held.items() if n}


def prompt_request(tokens: int, **kw) -> RouteRequest:
    return RouteRequest("r", tokens, 16, block_hashes=tuple(range(tokens // 16)), **kw)


def pools(**loads) -> Snapshot:
    return Snapshot(tuple(w(k, "prefill", **v) for k, v in loads.items() if k.startswith("p")),
                    tuple(w(k, "decode", **{"free_blocks": 1000, **v}) for k, v in loads.items() if k.startswith("d")))


def test_workload_aware_follows_cached_prefixes() -> None:
    policy = make_policy("workload_aware", index=FakeIndex({"p2": 60, "d1": 62}), local_prefill_tokens=0)
    r = policy.choose(pools(p1={}, p2={}, d1={}, d2={}), prompt_request(1000))
    assert (r.prefill.worker_id, r.decode.worker_id) == ("p2", "d1")
    assert (r.prefill_cached_blocks, r.decode_cached_blocks) == (60, 62)


def test_workload_aware_trades_a_cache_hit_for_a_shorter_queue() -> None:
    policy = make_policy("workload_aware", index=FakeIndex({"p2": 60}), local_prefill_tokens=0)
    busy = pools(p1={}, p2={"queued_prefill_tokens": 5000}, d1={})
    assert policy.choose(busy, prompt_request(1000)).prefill.worker_id == "p1"  # 1000 new tokens < 5000 queued + 40
    light = pools(p1={}, p2={"queued_prefill_tokens": 500}, d1={})
    assert policy.choose(light, prompt_request(1000)).prefill.worker_id == "p2"


def test_workload_aware_prefills_locally_when_the_decode_worker_lacks_little() -> None:
    policy = make_policy("workload_aware", index=FakeIndex({"d1": 60}), local_prefill_tokens=64)
    r = policy.choose(pools(p1={}, d1={}), prompt_request(1000))  # 1000 - 60 x 16 = 40 tokens missing
    assert r.prefill is None and r.path == "local" and r.decode_cached_blocks == 60
    far = policy.choose(pools(p1={}, d1={}), prompt_request(2000))
    assert far.prefill is not None and far.path == "disaggregated"
    full = pools(p1={}, d1={"free_blocks": 0})
    assert policy.choose(full, prompt_request(1000)).path == "disaggregated"  # no room to prefill there


def test_workload_aware_caps_a_shared_prefix_hotspot() -> None:
    """Every request shares one cached system prompt held by p1 / d1 only, and the cluster is
    idle: the costs alone would send every request there; the bounded-load cap splits them."""
    policy = make_policy("workload_aware", index=FakeIndex({"p1": 62, "d1": 62}), local_prefill_tokens=0, balance_factor=1.2)
    snap = pools(p1={}, p2={}, d1={}, d2={})
    picks = [policy.choose(snap, prompt_request(1100)) for _ in range(200)]
    for role in ("prefill", "decode"):
        counts = Counter(getattr(r, role).worker_id for r in picks)
        assert max(counts.values()) <= 1.5 * min(counts.values()), counts


class HistoryIndex:
    """Each conversation's history is cached on its home decode worker only."""

    def __init__(self, homes: dict[int, str]) -> None:
        self.homes = homes

    def match(self, block_hashes) -> dict[str, int]:
        return {self.homes[block_hashes[0] // 1000]: len(block_hashes) - 2}


def test_a_prefix_only_one_conversation_uses_may_pass_the_cap_up_to_one_and_a_half_shares() -> None:
    """Four conversations all homed on d1 (their histories, private to each, are cached there
    only): the 1.15 cap alone would move many of their turns to d2 and resend whole histories;
    private prefixes keep their home up to 1.5x d1's share, and no further."""
    policy = make_policy("workload_aware", index=HistoryIndex({c: "d1" for c in range(4)}), local_prefill_tokens=0, balance_factor=1.15)
    snap = pools(p1={}, d1={}, d2={})
    turns = [RouteRequest("r", 1600, 16, block_hashes=tuple(c * 1000 + turn * 10 + i for i in range(100))) for turn in range(8) for c in range(4)]
    homes = Counter(policy.choose(snap, t).decode.worker_id for t in turns)
    assert math.ceil(1.15 * 16) < homes["d1"] <= math.ceil(1.5 * 16), homes  # 32 turns, 2 workers: a share is 16
    shared = make_policy("workload_aware", index=HistoryIndex({0: "d1"}), local_prefill_tokens=0, balance_factor=1.15)
    same = RouteRequest("r", 1600, 16, block_hashes=tuple(range(100)))  # one prompt sent again and again: shared, capped
    counts = Counter(shared.choose(snap, same).decode.worker_id for _ in range(40))
    assert max(counts.values()) <= 1.5 * min(counts.values()), counts


# ---- prediction and admission ------------------------------------------------------------------
def test_admission_refuses_exactly_past_the_slo_with_slack_and_only_for_queued_work() -> None:
    from splitserve.router.policy import Route, admission_refusal

    d = w("d1", "decode")
    assert admission_refusal(Route(d, predicted_ttft=1.0, predicted_wait=0.5), slo_ttft_s=0.5, slack=2.0) is None  # 1.0 <= 0.5 x 2
    why = admission_refusal(Route(d, predicted_ttft=1.001, predicted_wait=0.5), slo_ttft_s=0.5, slack=2.0)
    assert why is not None and "predicted TTFT 1001 ms" in why and "allowed 1000 ms" in why
    assert admission_refusal(Route(d, predicted_ttft=9.0, predicted_wait=0.0), slo_ttft_s=0.5, slack=1.0) is None  # nothing to wait for


def test_an_idle_cluster_is_never_refused() -> None:
    import random

    from splitserve.router.policy import admission_refusal

    rng = random.Random(0)
    policy = make_policy("workload_aware", local_prefill_tokens=256, kv_block_bytes=1 << 16, seed=0)
    idle = pools(p1={}, p2={}, d1={}, d2={})
    for _ in range(200):
        r = policy.choose(idle, prompt_request(rng.randrange(16, 8000)))
        assert r.predicted_ttft > 0 and r.predicted_wait == 0
        assert admission_refusal(r, slo_ttft_s=0.001, slack=1.0) is None


def test_predicted_ttft_counts_the_queue_and_the_transfer() -> None:
    from splitserve.router.predictors import PrefillModel, TransferModel

    policy = make_policy("workload_aware", kv_block_bytes=1 << 20, prefill_model=PrefillModel(1000.0), transfer_model=TransferModel(1e9))
    r = policy.choose(pools(p1={"queued_prefill_tokens": 2000}, d1={}), prompt_request(1000))
    # 2 s of queued prompts, then the larger of 1 s of compute and 63 MiB at 1 GB/s
    assert abs(r.predicted_wait - 2.0) < 1e-9 and abs(r.predicted_ttft - 3.0) < 1e-9
    slow = make_policy("workload_aware", kv_block_bytes=1 << 20, prefill_model=PrefillModel(1000.0), transfer_model=TransferModel(1e7))
    assert abs(slow.choose(pools(p1={}, d1={}), prompt_request(1000)).predicted_ttft - 63 * (1 << 20) / 1e7) < 1e-6


def test_decodes_are_mixed_by_predicted_length() -> None:
    """Of the decode workers, the one running fewer heavy decodes takes the next heavy one."""
    policy = make_policy("workload_aware", seed=1)
    snap = pools(p1={}, d1={"inflight_heavy": 3}, d2={"inflight_heavy": 0})
    picks = Counter(policy.choose(snap, RouteRequest("r", 500, 2048, block_hashes=tuple(range(31)))).decode.worker_id for _ in range(20))
    assert picks["d2"] >= picks["d1"]


def test_colocated_routes_are_local() -> None:
    policy = make_policy("workload_aware")
    r = policy.choose(Snapshot.of([w("d1", "decode", free_blocks=100), w("d2", "decode", free_blocks=100)]),
                      RouteRequest("r", 1000, 16, block_hashes=tuple(range(62)), colocated=True))
    assert r.prefill is None and r.path == "local"
    for name in ("round_robin", "least_loaded"):
        assert make_policy(name).choose(Snapshot.of([w("d1", "decode")]), RouteRequest("r", 10, 4, colocated=True)).prefill is None
