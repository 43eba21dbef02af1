"""The router's view of the cluster: a snapshot of ready workers refreshed from the registry,
a channel per worker, and the router's own count of its requests on each worker.

Life cycle: start() polls the source every `poll_seconds` on a background thread and rebuilds
the workers' loads, adding the other routers' in-flight counts (published through Redis by
`share`: with several routers, a burst spread over them does not pile onto one worker, with a
staleness of about one poll); snapshot() adds this router's own counts to the workers that
have some (cheap at any cluster size). Worker channels are grpc.aio channels, made on first use on
the router's event loop. If the registry is unreachable the last snapshot is kept for
`stale_seconds` (workers keep serving while Redis restarts), then routing stops with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from splitserve.cluster.registry import WorkerRecord
from splitserve.proto.tls import TLSFiles
from splitserve.router.legs import WorkerClient
from splitserve.router.policy import Inflight, Snapshot, WorkerLoad, add_inflight

logger = logging.getLogger(__name__)
# publishes this router's in-flight counts, returns the other routers' summed per worker
InflightExchange = Callable[[dict[str, Inflight]], dict[str, Inflight]]


class ClusterView:
    def __init__(
        self,
        source: Callable[[], list[WorkerRecord]],
        *,
        token: str | None = None,
        tls: TLSFiles | None = None,
        model_fingerprint: str | None = None,
        poll_seconds: float = 0.1,
        stale_seconds: float = 30.0,
        share: InflightExchange | None = None,
    ) -> None:
        self._source = source
        self._share = share
        self._token = token
        self._tls = tls
        self._fingerprint = model_fingerprint
        self._poll = poll_seconds
        self._stale = stale_seconds
        self._records: list[WorkerRecord] = []
        self._fresh_at = float("-inf")  # not refreshed yet
        self._error = ""  # the last failed read's
        self._clients: dict[tuple[str, str], WorkerClient] = {}  # (worker id, address) -> channel
        self._inflight: dict[str, Inflight] = {}  # this router's (requests, prompt tokens, blocks, heavy) per worker
        self._base = Snapshot()  # loads as reported, rebuilt at each refresh
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-view", daemon=True)

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    async def close_channels(self) -> None:
        """On the event loop the channels were made on."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    def refresh(self) -> bool:
        try:
            records = self._source()
        except Exception as e:  # Redis away: keep the last view for a while
            logger.debug("registry read failed: %s", e)
            self._error = f"{type(e).__name__}: {e}"
            return False
        wrong = [r.worker_id for r in records if self._fingerprint and r.model_fingerprint and r.model_fingerprint != self._fingerprint]
        if wrong:
            logger.warning("ignoring workers serving another model: %s", wrong)
        others = self._exchange()
        loads = (self._load(r) for r in records if r.state == "ready" and r.worker_id not in wrong)
        base = Snapshot.of(add_inflight(w, others[w.worker_id]) if w.worker_id in others else w for w in loads)
        with self._lock:
            self._records = [r for r in records if r.worker_id not in wrong]
            self._base = base
            self._fresh_at = time.monotonic()
            # a worker that left the registry: forget its channel (requests still using it keep it
            # alive; it closes when the last one lets go)
            live = {(r.worker_id, r.address) for r in self._records}
            for key in [k for k in self._clients if k not in live]:
                del self._clients[key]
        return True

    def _exchange(self) -> dict[str, Inflight]:
        """Publish this router's in-flight counts; read the other routers' (when shared)."""
        if self._share is None:
            return {}
        with self._lock:
            mine = dict(self._inflight)
        try:
            return self._share(mine)
        except Exception as e:  # Redis away: route on this router's own counts meanwhile
            logger.debug("in-flight exchange failed: %s", e)
            return {}

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            self.refresh()

    # ---- reads ---------------------------------------------------------------------------
    def records(self) -> list[WorkerRecord]:
        with self._lock:
            return list(self._records) if time.monotonic() - self._fresh_at < self._stale else []

    def stale(self) -> str | None:
        """Why the view is empty when the registry is what failed (None while it answers)."""
        with self._lock:
            age = time.monotonic() - self._fresh_at
        if age < self._stale:
            return None
        since = "since this router started" if age == float("inf") else f"for {age:.0f} s"
        return f"the cluster registry (Redis) has not answered {since}: {self._error or 'no answer yet'}"

    def snapshot(self) -> Snapshot:
        with self._lock:
            if time.monotonic() - self._fresh_at >= self._stale:
                return Snapshot()
            base, inflight = self._base, dict(self._inflight)
        return base.with_inflight(inflight) if inflight else base

    @staticmethod
    def _load(r: WorkerRecord) -> WorkerLoad:
        s = r.load
        return WorkerLoad(
            r.worker_id, r.role, r.address, queued_prefill_tokens=s.get("queued_prefill_tokens", 0), running=s.get("running", 0),
            used_blocks=s.get("used_blocks", 0), reserved_blocks=s.get("reserved_blocks", 0), free_blocks=s.get("free_blocks", 0),
            total_blocks=s.get("total_blocks", 0),
        )

    def client(self, worker: WorkerLoad) -> WorkerClient:
        with self._lock:
            key = (worker.worker_id, worker.address)
            c = self._clients.get(key)
            if c is None:
                c = self._clients[key] = WorkerClient(worker.address, self._token, worker.worker_id, self._tls)
            return c

    # ---- the router's own accounting -----------------------------------------------------
    def add_inflight(self, worker_id: str, counts: Inflight) -> None:
        """Add (requests, prompt tokens, blocks, heavy) to this router's count for a worker."""
        with self._lock:
            now = tuple(a + b for a, b in zip(self._inflight.get(worker_id, (0, 0, 0, 0)), counts))
            if any(now):
                self._inflight[worker_id] = now
            else:
                self._inflight.pop(worker_id, None)
