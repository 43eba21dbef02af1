"""Requests that wait their turn at a prefill worker (behind a context-parallel group's one
job, or an engine's full batch) for longer than the decode worker's lease: the worker keeps
their reservations while the work ahead of them moves, and an abort takes one out of the queue
at once."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from splitserve.engine import LLM
from splitserve.router.legs import run_disaggregated
from tests.e2e.test_context_parallel import GREEDY, reserved, under_way
from tests.e2e.workers import WorkerStub

LEASE = 4.0  # the decode worker's lease in the queueing tests: shorter than the job they wait behind, longer than its layers


@pytest.fixture(scope="module")
def deep_model(make_checkpoint) -> Path:
    """More, shorter layers: a long job whose every layer lands well within LEASE."""
    return make_checkpoint(arch="llama", num_layers=32, hidden_size=64, num_heads=4, num_kv_heads=2, max_position_embeddings=8192, seed=22)


@pytest.fixture(scope="module")
def decode(spawn, deep_model: Path) -> WorkerStub:
    return WorkerStub(spawn("splitserve.decode_worker", "--model", str(deep_model), "--dtype", "float32", "--transports", "grpc,torch",
                            "--lease-seconds", str(LEASE)).address)


@pytest.fixture(scope="module")
def queueing(spawn, deep_model: Path, decode: WorkerStub):
    return spawn("splitserve.prefill_worker", "--model", str(deep_model), "--dtype", "float32", "--cp-degree", "2"), decode


def queued(group, decode: WorkerStub, rid: str, prompt: list[int], transport: str, results: dict) -> threading.Thread:
    """Start a request on a thread behind the group's current job; return once it is queued."""
    def client() -> None:
        try:
            results[rid] = run_disaggregated(group.address, decode.address, rid, prompt, GREEDY, transport=transport, timeout=300)
        except BaseException as e:
            results[rid] = e

    t = threading.Thread(target=client)
    t.start()
    end = time.monotonic() + 30
    while WorkerStub(group.address).stats("prefill").waiting_requests == 0 and time.monotonic() < end:
        time.sleep(0.02)
    return t


def served_after_waiting_past_its_lease(prefill, decode: WorkerStub, deep_model: Path, transport: str, seed: int) -> None:
    """A long prompt, then a short one queued behind it: the short one waits past its lease and
    is served, with the single engine's tokens."""
    rng = random.Random(seed)
    long_prompt = [rng.randrange(3, 500) for _ in range(4000)]
    short = [rng.randrange(3, 500) for _ in range(300)]
    results: dict = {}
    first, errors = under_way(prefill, decode, f"long-{seed}", long_prompt, transport)
    second = queued(prefill, decode, f"short-{seed}", short, transport, results)
    first.join(300)
    second.join(300)
    assert not errors, errors
    r = results[f"short-{seed}"]
    assert not isinstance(r, BaseException), r
    assert r.timings["prefill_queue"] > LEASE, r.timings  # it did wait past its lease (else this test proves nothing)
    assert r.token_ids == LLM(str(deep_model), dtype="float32").generate([short], GREEDY)[0].token_ids
    assert reserved(decode) == 0


def test_a_request_queued_behind_a_long_cp_prefill_keeps_its_reservation(queueing, deep_model: Path) -> None:
    """A CP group runs one prompt at a time, so a request may wait its turn for longer than the
    decode worker's lease. While the group makes progress the group keeps the queued request's
    reservation (the lease restarts at its touches): it is served, not failed UNAVAILABLE as a
    stalled prefill worker's (what happened before)."""
    served_after_waiting_past_its_lease(*queueing, deep_model, "torch", seed=11)


def test_a_queued_request_that_is_aborted_leaves_the_queue_at_once(queueing) -> None:
    """The prefill worker's Abort (what the router sends when the other leg fails or the client
    leaves) reaches a request still queued behind the group's current job: it ends now, ABORTED,
    and its decode-side reservation is freed; before, the abort found nothing and the request
    was prefilled anyway once its turn came, pushing KV to a reservation already gone."""
    from splitserve.proto import worker_pb2
    from splitserve.router.legs import LegError

    group, decode = queueing
    rng = random.Random(12)
    long_prompt = [rng.randrange(3, 500) for _ in range(4000)]
    results: dict = {}
    first, _ = under_way(group, decode, "long-abort", long_prompt, "grpc")
    waiter = queued(group, decode, "aborted-while-queued", [3 + i % 400 for i in range(500)], "grpc", results)
    prefill = WorkerStub(group.address)
    assert prefill.prefill.Abort(worker_pb2.AbortRequest(request_id="aborted-while-queued", reason="test"), timeout=10).found
    waiter.join(10)
    assert not waiter.is_alive(), "the aborted request stayed queued"
    e = results["aborted-while-queued"]
    assert isinstance(e, LegError) and e.status == "ABORTED" and e.leg == "prefill", e
    assert prefill.stats("prefill").waiting_requests == 0 and first.is_alive()  # gone from the queue while the long job still runs
    first.join(300)
    assert reserved(decode) == 0


def test_a_request_queued_behind_a_full_engine_keeps_its_reservation(spawn, deep_model: Path, decode: WorkerStub) -> None:
    """The same for a plain prefill worker whose engine takes one prompt at a time: the second
    prompt waits for the first, past its lease, and is served."""
    prefill = spawn("splitserve.prefill_worker", "--model", str(deep_model), "--dtype", "float32", "--max-num-seqs", "1")
    served_after_waiting_past_its_lease(prefill, decode, deep_model, "grpc", seed=13)
