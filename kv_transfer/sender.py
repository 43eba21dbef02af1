"""The sending side: a transport-specific `KVSender`, and `KVPusher`, which runs one
sender's traffic on its own thread so that transfers overlap the model's compute.

Life cycle of a request in a pusher:
    push_layer* (KV already copied out of the cache, so blocks may move on) -> commit -> done
    any send error fails that request (its commit future raises); an error that breaks the
    connection (PeerUnavailableError) fails every pending request and the pusher.
"""

from __future__ import annotations

import abc
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from splitserve.kv_transfer.errors import PeerUnavailableError, TransferError
from splitserve.kv_transfer.layout import FirstToken
from splitserve.kv_transfer.wire import MAX_MESSAGE_BYTES, PayloadHeader

logger = logging.getLogger(__name__)


class KVSender(abc.ABC):
    """Delivers payloads, commits and aborts to one receiver, in order. Called from one thread."""

    max_payload_bytes: int = MAX_MESSAGE_BYTES  # larger layers are split by blocks
    max_payload_blocks: int | None = None  # and so are layers of more blocks than this

    @abc.abstractmethod
    def send(self, header: PayloadHeader, kv: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def commit(self, request_id: str, secret: str, first: FirstToken, num_tokens: int) -> None:
        """Returns once the receiver has the commit (as far as the transport can tell)."""

    @abc.abstractmethod
    def abort(self, request_id: str, secret: str, reason: str) -> None: ...

    @abc.abstractmethod
    def touch(self, request_id: str, secret: str) -> None:
        """Tell the receiver the request's KV is still to come (its lease restarts)."""

    def finish(self, request_id: str) -> None:
        """End this sender's part of a request without committing it (another sender of a
        context-parallel group commits); returns once what was sent is delivered."""

    def close(self) -> None:
        """Release the connection."""


@dataclass
class _Job:
    request_id: str
    kind: str  # "payload" | "commit" | "flush" | "abort" | "touch"
    secret: str = ""
    header: PayloadHeader | None = None
    kv: torch.Tensor | None = None
    commit: tuple[FirstToken, int] | None = None
    reason: str = ""
    done: Future | None = None


class KVPusher:
    def __init__(self, sender: KVSender, name: str, max_queued: int = 256) -> None:
        self.sender = sender
        self.name = name
        self._jobs: queue.Queue[_Job | None] = queue.Queue(max_queued)
        self._failed: dict[str, BaseException] = {}
        self._lock = threading.Lock()
        self.broken: BaseException | None = None
        self.bytes_sent = 0
        self._thread = threading.Thread(target=self._run, name=f"kv-push-{name}", daemon=True)
        self._thread.start()

    def push(self, request_id: str, secret: str, layer: int, dst_blocks: list[int], kv: torch.Tensor) -> None:
        """Queue one layer's KV (`kv` [n, 2, bs, KH, D], already a copy) for `dst_blocks`;
        `secret` is the reservation's (TransferDescriptor.secret), as for commit and abort."""
        per_block = max(1, kv[0].numel() * kv.element_size())
        step = max(1, self.sender.max_payload_bytes // per_block)
        step = min(step, self.sender.max_payload_blocks or step)
        for i in range(0, len(dst_blocks), step):
            part = kv[i : i + step]
            header = PayloadHeader.for_tensor(request_id, secret, layer, dst_blocks[i : i + step], part)
            self._put(_Job(request_id, "payload", header=header, kv=part))

    def commit(self, request_id: str, secret: str, first: FirstToken, num_tokens: int) -> Future:
        """Queue the commit; the future resolves when it is delivered, or raises the request's
        first send error."""
        done: Future = Future()
        self._put(_Job(request_id, "commit", secret, commit=(first, num_tokens), done=done))
        return done

    def flush(self, request_id: str) -> Future:
        """Queue the end of this sender's part of the request (no commit); the future resolves
        once the request's payloads are delivered, or raises its first send error."""
        done: Future = Future()
        self._put(_Job(request_id, "flush", done=done))
        return done

    def abort(self, request_id: str, secret: str, reason: str) -> None:
        with self._lock:
            self._failed.setdefault(request_id, TransferError(f"aborted: {reason}"))
        self._put(_Job(request_id, "abort", secret, reason=reason))

    def failure(self, request_id: str) -> BaseException | None:
        """The error that already failed the request here (or broke the pusher), if any."""
        with self._lock:
            return self.broken or self._failed.get(request_id)

    def touch(self, request_id: str, secret: str) -> None:
        """Queue a touch: the request is still coming (queued here behind other work), so the
        receiver keeps its reservation for another lease."""
        self._put(_Job(request_id, "touch", secret))

    def close(self) -> None:
        """Finish what is queued, then close the connection; later calls fail at once."""
        self._jobs.put(None)
        self._thread.join(timeout=10)
        self.broken = self.broken or PeerUnavailableError(f"KV pusher {self.name} closed")
        self._fail_queued()
        self.sender.close()

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.done is not None and not job.done.done():
                job.done.set_exception(self.broken)

    def _put(self, job: _Job) -> None:
        if self.broken is not None:
            if job.done is not None:
                job.done.set_exception(self.broken)
            return
        self._jobs.put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self.broken is not None:
                if job.done is not None:
                    job.done.set_exception(self.broken)
                continue
            with self._lock:
                failed = self._failed.get(job.request_id)
            try:
                self._do(job, failed)
            except PeerUnavailableError as e:
                logger.warning("KV pusher %s lost its receiver: %s", self.name, e)
                self.broken = e
                if job.done is not None:
                    job.done.set_exception(e)
            except Exception as e:  # one request's failure; the connection lives on
                logger.warning("KV transfer of %s to %s failed: %s", job.request_id, self.name, e)
                with self._lock:
                    self._failed.setdefault(job.request_id, e)
                if job.done is not None:
                    job.done.set_exception(e)

    def _do(self, job: _Job, failed: BaseException | None) -> None:
        if job.kind == "abort":
            self.sender.abort(job.request_id, job.secret, job.reason)
            with self._lock:
                self._failed.pop(job.request_id, None)
        elif failed is not None:
            if job.done is not None:
                with self._lock:
                    self._failed.pop(job.request_id, None)
                job.done.set_exception(failed)
        elif job.kind == "payload":
            self.sender.send(job.header, job.kv)
            self.bytes_sent += job.header.byte_length
        elif job.kind == "touch":
            self.sender.touch(job.request_id, job.secret)
        elif job.kind == "flush":
            self.sender.finish(job.request_id)
            job.done.set_result(None)
        else:
            self.sender.commit(job.request_id, job.secret, *job.commit)
            job.done.set_result(None)
