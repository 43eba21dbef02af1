"""The workload-aware router against real workers: colocated serving as a baseline mode, SLO
admission through both front doors, and several routers sharing their in-flight load."""

from __future__ import annotations

import random
import time
import urllib.request
from pathlib import Path

import pytest

from splitserve.engine import LLM, SamplingParams
from splitserve.proto.client import ResourceExhaustedError
from tests.e2e.local_cluster import InThread, post, wait_until


def test_colocated_workers_match_the_single_engine(make_cluster, e2e_model: Path) -> None:
    c = make_cluster(colocated=True).start(("decode", []), ("decode", []))
    single = LLM(str(e2e_model), dtype="float32")
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (1, 17, 300, 900)]
    cases = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)]
    with c.client(timeout=60) as sdk:
        for params in cases:
            expected = [o.token_ids for o in single.generate(prompts, params)]
            for prompt, want in zip(prompts, expected):
                done = sdk.generate(prompt, max_tokens=12, temperature=params.temperature, top_p=params.top_p, seed=params.seed, ignore_eos=True)
                assert done.token_ids == want
                assert done.timings["path"] == "local" and not done.timings["prefill_worker"] and done.timings["kv_bytes"] == 0
    health = urllib.request.urlopen(c.http + "/health", timeout=10)
    assert health.status == 200  # no prefill pool, and healthy
    c.assert_idle()


def test_slo_admission_refuses_queued_requests_at_once(make_cluster) -> None:
    c = make_cluster(slo={"ttft_ms": 2000, "admission": True, "slack": 1.0})
    c.start(("prefill", ["--max-prefill-chunk", "16", "--max-num-batched-tokens", "16"]), ("decode", []))
    (p,) = [w for w in c.workers.values() if w.ready["role"] == "prefill"]
    rng = random.Random(6)
    with c.client(timeout=120) as sdk:
        # an idle cluster serves even a request whose own SLO no placement could meet
        assert sdk.generate([rng.randrange(3, 500) for _ in range(300)], max_tokens=4, slo_ttft_ms=1).finish_reason == "length"
        # the router learns this prefill worker's speed (16 tokens a step) from requests like these
        for _ in range(3):
            sdk.generate([rng.randrange(3, 500) for _ in range(400)], max_tokens=2)
        backlog = [InThread(lambda: sdk.generate([rng.randrange(3, 500) for _ in range(3000)], max_tokens=2, slo_ttft_ms=600_000))
                   for _ in range(3)]  # patient requests: admitted whatever the queue
        wait_until(lambda: c.stats(p).waiting_requests + c.stats(p).running_requests >= 3, 30, "a prefill backlog")
        start = time.monotonic()
        with pytest.raises(ResourceExhaustedError) as e:
            sdk.generate([rng.randrange(3, 500) for _ in range(200)], max_tokens=4, slo_ttft_ms=500)
        assert time.monotonic() - start < 1.0, "refused at once, not after queueing"
        message = str(e.value)
        assert "predicted TTFT" in message and "allowed 500 ms" in message, message
        status, body, headers = post(c.http, {"prompt": [7] * 200, "max_tokens": 4, "slo_ttft_ms": 500})
        assert status == 429 and "predicted TTFT" in body["error"]["message"] and int(headers["retry-after"]) >= 1
        for b in backlog:
            assert b.result(300).finish_reason == "length"  # what was admitted is served
    metrics = urllib.request.urlopen(c.http + "/metrics", timeout=10).read().decode()
    assert 'splitserve:requests_refused_total{reason="slo"} 2.0' in metrics
    c.assert_idle()


def test_several_routers_share_their_inflight_load(make_cluster) -> None:
    """Four routers, each sending a long request in turn: the workers' heartbeats are slow (5 s),
    so only the routers' shared in-flight counts show them where the others' requests went."""
    c = make_cluster(router={"policy": "least_loaded"}, heartbeat_seconds=5.0, heartbeat_ttl_seconds=15.0)
    c.start(("prefill", []), ("decode", []), ("decode", []), routers=4)
    clients = [c.client(i, timeout=120) for i in range(4)]
    try:
        running = []
        for i in range(12):
            # 4,000 tokens: the first request is still decoding when the last one lands (2,000
            # tokens took under 4 s on a quiet machine, less than the 12 x 0.3 s of submissions)
            running.append(InThread(lambda k=i: clients[k % 4].generate([3 + k] * 40, max_tokens=4000, temperature=0, ignore_eos=True)))
            time.sleep(0.3)
        decode = [w for w in c.workers.values() if w.ready["role"] == "decode"]
        # the last request may still be in prefill or on its way: wait until all 12 decode
        wait_until(lambda: sum(c.stats(w).running_requests for w in decode) == 12, 30, "all 12 requests decoding")
        counts = [c.stats(w).running_requests for w in decode]
        assert max(counts) <= 1.5 * min(counts), counts
    finally:
        for cl in clients:
            cl.close()  # the placement is what was to see: the clients leave (their requests end)
    for r in running:
        r.thread.join(30)
        assert r.error is not None and "Channel closed" in str(r.error), r.error  # ended by the client here, not failed there
    c.assert_idle()
