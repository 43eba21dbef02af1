"""Prefix-aware routing end to end: workers publish KV events, routers index them, requests
follow their cached prefixes, move only the KV the decode worker lacks or are prefilled on the
decode worker itself, and no worker becomes a hotspot. Tokens always equal the single engine's."""

from __future__ import annotations

import random
import time
import urllib.request
from collections import Counter

from splitserve.engine import LLM, SamplingParams

GREEDY = dict(max_tokens=12, temperature=0, ignore_eos=True)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # layers x (K, V) x block size x KV heads x head dim x float32


def expected(single: LLM, prompt: list[int]) -> list[int]:
    return single.generate([prompt], SamplingParams(**GREEDY))[0].token_ids


def words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 500) for _ in range(n)]


def settle() -> None:
    time.sleep(1.0)  # workers publish events every 0.2 s; routers read them as they come


def test_turns_follow_their_prefix_and_short_tails_are_prefilled_locally(make_cluster, single: LLM) -> None:
    """Two conversations at once, three turns each: every turn goes back to the decode worker
    holding its history; a short new tail is prefilled there (path local), a long one is
    disaggregated and moves only its new blocks."""
    c = make_cluster(routing={"local_prefill_tokens": 200}).start(("prefill", []), ("prefill", []), ("decode", []), ("decode", []))
    rng = random.Random(1)
    history = {a: words(rng, 600) for a in "AB"}
    home: dict[str, str] = {}
    with c.client(timeout=60) as sdk:
        for turn, new_tokens in enumerate([0, 150, 400]):
            for conv in "AB":
                prompt = history[conv] + words(rng, new_tokens)
                r = sdk.generate(prompt, **GREEDY)
                assert r.token_ids == expected(single, prompt), (conv, turn)
                t = r.timings
                if turn == 0:
                    assert t["path"] == "disaggregated" and t["kv_bytes"] == -(-len(prompt) // 16) * BLOCK_BYTES
                    home[conv] = t["decode_worker"]
                else:
                    assert t["decode_worker"] == home[conv] and t["decode_cached_tokens"] >= len(history[conv]) - 16, (conv, turn, t)
                    assert r.usage["cached_tokens"] == (t["decode_cached_tokens"] if t["path"] == "local" else t["prefill_cached_tokens"])
                if turn == 1:  # ~150 tokens missing: prefilled on the decode worker itself
                    assert t["path"] == "local" and not t["prefill_worker"] and t["kv_bytes"] == 0
                if turn == 2:  # ~400 missing: disaggregated, only the new blocks move
                    assert t["path"] == "disaggregated"
                    assert t["kv_bytes"] == (-(-len(prompt) // 16) - t["decode_cached_tokens"] // 16) * BLOCK_BYTES
                history[conv] = prompt + r.token_ids
            settle()
    assert home["A"] != home["B"]
    metrics = urllib.request.urlopen(c.http + "/metrics", timeout=10).read().decode()
    assert 'splitserve:requests_by_path_total{path="local"} 2.0' in metrics
    assert 'splitserve:prefix_cache_hits_total{pool="decode"}' in metrics
    c.assert_idle()


def test_a_restarted_router_rebuilds_its_index(make_cluster, single: LLM) -> None:
    c = make_cluster().start(("prefill", []), ("decode", []), ("decode", []), routers=2)
    rng = random.Random(2)
    turn1 = words(rng, 500)
    with c.client(0, timeout=60) as sdk:
        r1 = sdk.generate(turn1, **GREEDY)
    settle()
    c.routers[0].stop()  # the router that served turn 1 goes away; the other one started before turn 1
    second = c.add_router()  # and a new one starts after it
    turn2 = turn1 + r1.token_ids + words(rng, 300)
    for router in (1, c.routers.index(second)):
        with c.client(router, timeout=60) as sdk:
            r2 = sdk.generate(turn2, **GREEDY)
        assert r2.token_ids == expected(single, turn2)
        assert r2.timings["decode_worker"] == r1.timings["decode_worker"] and r2.timings["decode_cached_tokens"] >= 496
    c.assert_idle()


def test_a_shared_system_prompt_does_not_make_a_hotspot(make_cluster) -> None:
    """Every request starts with one 1,000-token system prompt: cache affinity alone would send
    them all to whichever worker cached it first."""
    c = make_cluster().start(("prefill", []), ("prefill", []), ("decode", []), ("decode", []))
    rng = random.Random(3)
    system = words(rng, 1000)
    prefill, decode = Counter(), Counter()
    with c.client(timeout=60) as sdk:
        for i in range(40):
            t = sdk.generate(system + words(rng, 30), max_tokens=4, temperature=0, ignore_eos=True).timings
            prefill[t["prefill_worker"]] += 1
            decode[t["decode_worker"]] += 1
            if i == 0:
                settle()
    for counts in (prefill, decode):
        assert len(counts) == 2 and max(counts.values()) <= 1.5 * min(counts.values()), counts
    c.assert_idle()
