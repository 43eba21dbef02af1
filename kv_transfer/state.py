"""The receiver's table of transfers: one entry per reserved request, plain Python.

Life cycle of an entry:
    RESERVED --first payload--> RECEIVING --commit with every layer of every block--> COMPLETE
    RESERVED | RECEIVING --bad payload, sender abort, local abort, peer lost--> FAILED
    RESERVED | RECEIVING --no progress for lease_seconds--> EXPIRED
A sender's payloads, commit and abort carry the reservation's one-time secret; one without it
is refused (WrongSecretError) and changes nothing.
The lease counts from the reservation and restarts at each payload, and at each touch (a sender
whose prefill is queued behind other work saying it still means to send), so a long transfer that
keeps moving is never cut off, and a silent one is. A terminal entry is reported exactly once
through `on_done`, and only when no payload write into its blocks is still in flight, so the
owner can free or admit the blocks without racing a writer.
"""

from __future__ import annotations

import enum
import hmac
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from splitserve.kv_transfer.errors import PayloadError, TransferClosedError, TransferNotFoundError, WrongSecretError
from splitserve.kv_transfer.layout import FirstToken


class TransferState(enum.Enum):
    RESERVED = "reserved"
    RECEIVING = "receiving"
    COMPLETE = "complete"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in (TransferState.COMPLETE, TransferState.FAILED, TransferState.EXPIRED)


@dataclass
class Transfer:
    request_id: str
    block_ids: list[int]
    num_tokens: int
    lease_seconds: float
    deadline: float
    num_layers: int
    state: TransferState = TransferState.RESERVED
    reason: str = ""
    status: str = ""  # canonical status of a failure: what the request it belongs to reports
    secret: str = ""
    first: FirstToken | None = None  # set by the commit
    bytes_received: int = 0
    payloads: int = 0
    started: float = field(default_factory=time.monotonic)
    first_payload: float | None = None
    finished: float | None = None
    _received: list[set[int]] = field(default_factory=list)
    _busy: int = 0
    _reported: bool = False

    def missing(self) -> str | None:
        """A description of the first layer whose blocks did not all arrive, or None."""
        want = set(self.block_ids)
        for layer, got in enumerate(self._received):
            if got != want:
                return f"layer {layer} has {len(got & want)} of {len(want)} blocks"
        return None


class TransferTable:
    def __init__(
        self, num_layers: int, on_done: Callable[[Transfer], None], clock: Callable[[], float] = time.monotonic, commit_grace: float = 10.0
    ) -> None:
        self.num_layers = num_layers
        self.commit_grace = commit_grace
        self._on_done = on_done
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._transfers: dict[str, Transfer] = {}
        self.bytes_received_total = 0
        self.transfers_total: dict[str, int] = {s.value: 0 for s in TransferState if s.terminal}

    # ---- reservations --------------------------------------------------------------------
    def reserve(self, request_id: str, block_ids: Sequence[int], num_tokens: int, lease_seconds: float, secret: str = "") -> Transfer:
        now = self._clock()
        t = Transfer(request_id, list(block_ids), num_tokens, lease_seconds, now + lease_seconds, self.num_layers, secret=secret)
        t._received = [set() for _ in range(self.num_layers)]
        with self._lock:
            if request_id in self._transfers:
                raise PayloadError(f"request {request_id!r} already has a transfer")
            self._transfers[request_id] = t
        return t

    def get(self, request_id: str) -> Transfer | None:
        with self._lock:
            return self._transfers.get(request_id)

    def pop(self, request_id: str) -> Transfer | None:
        with self._lock:
            return self._transfers.pop(request_id, None)

    def active(self) -> int:
        with self._lock:
            return sum(1 for t in self._transfers.values() if not t.state.terminal)

    # ---- payloads ------------------------------------------------------------------------
    def authorize(self, request_id: str, secret: str) -> None:
        """Raise unless `request_id` has a reservation and `secret` is its secret."""
        with self._lock:
            self._authorized(request_id, secret)

    def begin_payload(self, request_id: str, secret: str, layer: int, block_ids: Sequence[int]) -> Transfer:
        """Check a payload's target and mark a write in flight; end with `end_payload`."""
        with self._lock:
            t = self._authorized(request_id, secret)
            if t.state.terminal:
                # the late sender learns why it ended (a lease that expired stays DEADLINE_EXCEEDED)
                raise TransferClosedError(f"request {request_id!r} is {t.state.value} ({t.reason})", t.status or None)
            bad = self._target_error(t, layer, block_ids)
            if bad:
                self._finish(t, TransferState.FAILED, bad, "INTERNAL")
                done = self._take_report(t)
            else:
                now = self._clock()
                t.state = TransferState.RECEIVING
                t.first_payload = t.first_payload or now
                t.deadline = now + t.lease_seconds
                t._busy += 1
                return t
        self._report(done)
        raise PayloadError(bad)

    def touch(self, request_id: str, secret: str) -> bool:
        """Restart the lease of a transfer still waiting for KV; False if it has ended."""
        with self._lock:
            t = self._authorized(request_id, secret)
            if t.state.terminal:
                return False
            t.deadline = max(t.deadline, self._clock() + t.lease_seconds)
            return True

    def end_payload(self, t: Transfer, layer: int, block_ids: Sequence[int], nbytes: int, error: str | None = None) -> None:
        """`error`: why the payload could not be landed (the transfer fails with INTERNAL)."""
        with self._lock:
            t._busy -= 1
            if error is not None:
                self._finish(t, TransferState.FAILED, error, "INTERNAL")
            elif not t.state.terminal:
                t._received[layer].update(block_ids)
                t.bytes_received += nbytes
                self.bytes_received_total += nbytes
                t.payloads += 1
                self._changed.notify_all()
            done = self._take_report(t)
        self._report(done)

    def commit(self, request_id: str, secret: str, first: FirstToken, num_tokens: int) -> Transfer:
        """Complete the transfer if every layer of every block arrived. Payloads from other
        senders (the ranks of a context-parallel group) may still be landing: wait for them up
        to `commit_grace` seconds before calling the transfer incomplete."""
        end = time.monotonic() + self.commit_grace
        with self._lock:
            t = self._authorized(request_id, secret)
            while not t.state.terminal and t.missing() and time.monotonic() < end:
                self._changed.wait(max(0.0, end - time.monotonic()))
            if not t.state.terminal:
                missing = t.missing()
                if num_tokens != t.num_tokens:
                    self._finish(t, TransferState.FAILED, f"commit for {num_tokens} tokens, reserved {t.num_tokens}", "INTERNAL")
                elif missing:
                    self._finish(t, TransferState.FAILED, f"commit before all KV arrived: {missing}", "INTERNAL")
                else:
                    t.first = first
                    self._finish(t, TransferState.COMPLETE, "")
            done = self._take_report(t)
        self._report(done)
        return t

    def fail(self, request_id: str, reason: str, status: str = "ABORTED") -> bool:
        """Fail a transfer that is not finished yet (`status`: ABORTED for an abort,
        UNAVAILABLE for a lost sender, INTERNAL for bad data); False if there is none."""
        with self._lock:
            t = self._transfers.get(request_id)
            if t is None or t.state.terminal:
                return False
            self._finish(t, TransferState.FAILED, reason, status)
            done = self._take_report(t)
        self._report(done)
        return True

    def expire(self) -> list[Transfer]:
        """Expire every transfer whose lease ran out; returns them."""
        now = self._clock()
        with self._lock:
            due = [t for t in self._transfers.values() if not t.state.terminal and t.deadline <= now]
            for t in due:
                self._finish(t, TransferState.EXPIRED, f"no KV for {t.lease_seconds:g} s (lease expired)", "DEADLINE_EXCEEDED")
            done = [t for t in due if self._take_report(t)]
        for t in done:
            self._report(t)
        return due

    def wait(self, request_id: str, timeout: float) -> Transfer:
        """Block until the transfer is terminal (or `timeout` passes); returns it."""
        end = time.monotonic() + timeout
        with self._lock:
            while True:
                t = self._transfers.get(request_id)
                if t is None:
                    raise TransferNotFoundError(f"no reservation for request {request_id!r}")
                left = end - time.monotonic()
                if t.state.terminal or left <= 0:
                    return t
                self._changed.wait(left)

    # ---- internals (lock held) -----------------------------------------------------------
    def _authorized(self, request_id: str, secret: str) -> Transfer:
        t = self._transfers.get(request_id)
        if t is None:
            raise TransferNotFoundError(f"no reservation for request {request_id!r}")
        if not hmac.compare_digest(t.secret.encode(), secret.encode()):
            raise WrongSecretError(f"wrong transfer secret for request {request_id!r}: refused, the reservation is unchanged")
        return t

    def _target_error(self, t: Transfer, layer: int, block_ids: Sequence[int]) -> str | None:
        if not 0 <= layer < self.num_layers:
            return f"payload for layer {layer}; the model has {self.num_layers}"
        if not block_ids:
            return "payload names no blocks"
        stray = set(block_ids) - set(t.block_ids)
        if stray:
            return f"payload names blocks {sorted(stray)[:4]} not reserved for {t.request_id!r}"
        return None

    def _finish(self, t: Transfer, state: TransferState, reason: str, status: str = "") -> None:
        if t.state.terminal:
            return
        t.state, t.reason, t.status, t.finished = state, reason, status, self._clock()
        self.transfers_total[state.value] += 1
        self._changed.notify_all()

    def _take_report(self, t: Transfer) -> Transfer | None:
        if t.state.terminal and t._busy == 0 and not t._reported:
            t._reported = True
            return t
        return None

    def _report(self, t: Transfer | None) -> None:
        if t is not None:
            self._on_done(t)
