"""The receiver's transfer table: plain Python, a fake clock."""

from __future__ import annotations

import pytest

from splitserve.kv_transfer.errors import PayloadError, TransferClosedError, TransferNotFoundError, WrongSecretError
from splitserve.kv_transfer.layout import FirstToken
from splitserve.kv_transfer.state import TransferState, TransferTable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def table(layers: int = 2):
    done = []
    clock = Clock()
    return TransferTable(layers, done.append, clock, commit_grace=0.05), done, clock


def land(t: TransferTable, rid: str, layers: int, blocks: list[int]) -> None:
    for layer in range(layers):
        tr = t.begin_payload(rid, "", layer, blocks)
        t.end_payload(tr, layer, blocks, 100)


def test_complete_after_every_layer_and_commit() -> None:
    t, done, _ = table()
    t.reserve("r", [4, 5], 20, lease_seconds=30)
    land(t, "r", 2, [4, 5])
    tr = t.commit("r", "", FirstToken(7, -0.5), num_tokens=20)
    assert tr.state is TransferState.COMPLETE and tr.first == FirstToken(7, -0.5) and tr.bytes_received == 200
    assert done == [tr]


def test_commit_with_a_missing_layer_fails_and_names_it() -> None:
    t, done, _ = table()
    t.reserve("r", [4, 5], 20, 30)
    tr = t.begin_payload("r", "", 0, [4, 5])
    t.end_payload(tr, 0, [4, 5], 100)
    tr = t.commit("r", "", FirstToken(1), 20)
    assert tr.state is TransferState.FAILED and "layer 1 has 0 of 2 blocks" in tr.reason
    assert done == [tr]


def test_stray_blocks_and_bad_layers_fail_the_transfer() -> None:
    t, done, _ = table()
    t.reserve("r", [4, 5], 20, 30)
    with pytest.raises(PayloadError, match="not reserved"):
        t.begin_payload("r", "", 0, [4, 9])
    assert t.get("r").state is TransferState.FAILED and len(done) == 1
    t.reserve("s", [1], 3, 30)
    with pytest.raises(PayloadError, match="layer 5"):
        t.begin_payload("s", "", 5, [1])
    with pytest.raises(TransferNotFoundError):
        t.begin_payload("nobody", "", 0, [1])


def test_lease_expires_without_progress_and_restarts_on_payloads() -> None:
    t, done, clock = table()
    t.reserve("idle", [1], 3, lease_seconds=10)
    t.reserve("busy", [2], 3, lease_seconds=10)
    clock.now = 8
    tr = t.begin_payload("busy", "", 0, [2])
    t.end_payload(tr, 0, [2], 10)
    clock.now = 12
    assert [x.request_id for x in t.expire()] == ["idle"]
    assert t.get("idle").state is TransferState.EXPIRED and "lease expired" in t.get("idle").reason
    clock.now = 17.9
    assert t.expire() == []
    clock.now = 18.1
    assert [x.request_id for x in t.expire()] == ["busy"]
    assert [x.request_id for x in done] == ["idle", "busy"]


def test_a_touch_restarts_the_lease_of_a_transfer_still_waiting() -> None:
    """A sender whose prefill is queued behind other work touches the reservation: its lease
    restarts, as at a payload; a transfer that has ended stays ended; a stranger changes nothing."""
    t, done, clock = table()
    t.reserve("queued", [1], 3, lease_seconds=10, secret="s")
    clock.now = 8
    assert t.touch("queued", "s")
    with pytest.raises(WrongSecretError):
        t.touch("queued", "not-it")
    clock.now = 17.9
    assert t.expire() == [] and t.get("queued").state is TransferState.RESERVED
    clock.now = 18.1
    assert [x.request_id for x in t.expire()] == ["queued"]
    assert not t.touch("queued", "s") and t.get("queued").state is TransferState.EXPIRED
    assert [x.request_id for x in done] == ["queued"]


def test_report_waits_for_a_write_in_flight() -> None:
    t, done, clock = table()
    t.reserve("r", [1], 3, lease_seconds=1)
    tr = t.begin_payload("r", "", 0, [1])  # a write into the blocks is under way...
    clock.now = 5
    t.expire()  # ...when the lease runs out: the owner must not free the blocks yet
    assert tr.state is TransferState.EXPIRED and done == []
    t.end_payload(tr, 0, [1], 10)
    assert done == [tr]


def test_fail_is_reported_once_and_later_payloads_are_refused() -> None:
    t, done, _ = table()
    t.reserve("r", [1], 3, 30)
    assert t.fail("r", "sender aborted")
    assert not t.fail("r", "again")
    with pytest.raises(TransferClosedError, match="failed"):
        t.begin_payload("r", "", 0, [1])
    assert len(done) == 1 and t.active() == 0


def test_failures_carry_the_status_their_request_reports() -> None:
    from splitserve.kv_transfer.errors import (
        HandshakeRefusedError,
        PayloadError,
        PeerUnavailableError,
        TransferError,
        request_status,
    )

    t, _, clock = table()
    t.reserve("aborted", [1], 3, 30)
    t.fail("aborted", "sender aborted: prefill failed")
    t.reserve("lost", [2], 3, 30)
    t.fail("lost", "KV sender lost", "UNAVAILABLE")
    t.reserve("idle", [3], 3, lease_seconds=1)
    t.reserve("stray", [4], 3, 30)
    with pytest.raises(PayloadError):
        t.begin_payload("stray", "", 0, [9])
    clock.now = 2
    t.expire()
    assert {r: t.get(r).status for r in ("aborted", "lost", "idle", "stray")} == {
        "aborted": "ABORTED", "lost": "UNAVAILABLE", "idle": "DEADLINE_EXCEEDED", "stray": "INTERNAL"}
    # what the prefill side tells the router: never a client error for a fault between workers
    assert request_status(PayloadError("truncated")) == "INTERNAL"
    assert request_status(TransferError("x", "NOT_FOUND")) == "INTERNAL"
    assert request_status(PeerUnavailableError("gone")) == "UNAVAILABLE"
    assert request_status(HandshakeRefusedError("dtype differs")) == "FAILED_PRECONDITION"
    assert request_status(ValueError("?")) == "INTERNAL"


def test_commit_with_wrong_token_count_fails() -> None:
    t, _, _ = table(layers=1)
    t.reserve("r", [1], 3, 30)
    land(t, "r", 1, [1])
    assert t.commit("r", "", FirstToken(1), num_tokens=4).state is TransferState.FAILED


def test_a_wrong_secret_is_refused_and_changes_nothing() -> None:
    t, done, _ = table(layers=1)
    t.reserve("r", [1], 3, 30, secret="s3cret")
    for wrong in ("", "guess", "s3cre"):
        with pytest.raises(WrongSecretError, match="reservation is unchanged"):
            t.begin_payload("r", wrong, 0, [1])
        with pytest.raises(WrongSecretError):
            t.commit("r", wrong, FirstToken(1), 3)
        with pytest.raises(WrongSecretError):
            t.authorize("r", wrong)
    assert t.get("r").state is TransferState.RESERVED and t.get("r").bytes_received == 0 and done == []
    land_with = t.begin_payload("r", "s3cret", 0, [1])
    t.end_payload(land_with, 0, [1], 10)
    assert t.commit("r", "s3cret", FirstToken(4), 3).state is TransferState.COMPLETE
