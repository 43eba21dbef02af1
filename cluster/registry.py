"""The cluster's shared state in Redis: who serves, how loaded, what the pools should be.

Keys (all under `splitserve:{cluster}:`, so clusters can share one Redis):
    worker:{id}   JSON `WorkerRecord`, rewritten by the worker's heartbeat with a TTL: a worker
                  that stops beating vanishes from routing by itself, and one that beats again
                  after a Redis restart is back at the next beat
    target        hash role -> replicas the controller reconciles towards
    declared      hash role -> replicas cluster.yaml last said (tells a changed config from a restart)
    drain         set of worker ids asked to drain
    cp:{id}       rendezvous address of context-parallel group {id}'s rank 0
    inflight:{router}  hash worker -> "requests,prompt tokens,blocks,heavy": the requests that
                  router has on each worker, rewritten a few times a second with a short TTL
    routers       sorted set of router ids by the time they last wrote their in-flight counts
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from splitserve.cluster.worker_record import WorkerRecord

logger = logging.getLogger(__name__)


class Registry:
    def __init__(self, redis_url: str, cluster: str, ttl_seconds: float = 5.0) -> None:
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.prefix = f"splitserve:{cluster}:"
        self.ttl_ms = int(ttl_seconds * 1000)

    # ---- workers -------------------------------------------------------------------------
    def publish(self, record: WorkerRecord) -> None:
        record.heartbeat = time.time()
        self.redis.set(self.prefix + "worker:" + record.worker_id, record.to_json(), px=self.ttl_ms)

    def forget(self, worker_id: str) -> None:
        self.redis.delete(self.prefix + "worker:" + worker_id)
        self.redis.srem(self.prefix + "drain", worker_id)

    def workers(self) -> list[WorkerRecord]:
        keys = sorted(self.redis.scan_iter(match=self.prefix + "worker:*", count=500))
        if not keys:
            return []
        return [WorkerRecord.from_json(v) for v in self.redis.mget(keys) if v is not None]

    # ---- desired state -------------------------------------------------------------------
    def targets(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.prefix + "target").items()}

    def set_target(self, role: str, replicas: int) -> None:
        self.redis.hset(self.prefix + "target", role, replicas)

    def init_targets(self, targets: dict[str, int]) -> None:
        """Set targets that are not set yet (a restarted controller keeps what users scaled to)."""
        for role, n in targets.items():
            self.redis.hsetnx(self.prefix + "target", role, n)

    def declare_targets(self, targets: dict[str, int]) -> None:
        """The pool sizes cluster.yaml says, at a controller's start: a size the file changed since
        the last declaration becomes the target (a redeploy with new replicas is obeyed); an
        unchanged one only fills a missing target (a restart keeps what users scaled to)."""
        for role, n in targets.items():
            last = self.redis.hget(self.prefix + "declared", role)
            if last is None or int(last) != n:
                self.redis.hset(self.prefix + "target", role, n)
                self.redis.hset(self.prefix + "declared", role, n)
            else:
                self.redis.hsetnx(self.prefix + "target", role, n)

    def request_drain(self, worker_id: str) -> None:
        self.redis.sadd(self.prefix + "drain", worker_id)

    # one step: two drains of one worker (a retried call, two routers) lower the target once
    _DRAIN_ONE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
local n = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], math.max(0, n - 1))
return 1
"""

    def drain_one(self, worker_id: str, role: str, default_target: int = 1) -> bool:
        """Ask `worker_id` to drain and lower its pool's target by one, so that it is not
        replaced; False (and nothing changed) when it was already draining."""
        keys = [self.prefix + "drain", self.prefix + "target"]
        return bool(self.redis.eval(self._DRAIN_ONE, len(keys), *keys, worker_id, role, default_target))

    def draining(self) -> set[str]:
        return {m.decode() for m in self.redis.smembers(self.prefix + "drain")}

    def publish_cp_store(self, worker_id: str, address: str, ttl_seconds: float = 600.0) -> None:
        self.redis.set(self.prefix + "cp:" + worker_id, address, ex=int(ttl_seconds))

    def cp_store(self, worker_id: str, timeout: float = 300.0) -> str:
        """The rendezvous address rank 0 of CP group `worker_id` published (waits for it)."""
        end = time.monotonic() + timeout
        while (value := self.redis.get(self.prefix + "cp:" + worker_id)) is None:
            if time.monotonic() > end:
                raise TimeoutError(f"rank 0 of context-parallel group {worker_id} did not publish its rendezvous in {timeout:g} s")
            time.sleep(0.1)
        return value.decode()

    # ---- routers' in-flight counts --------------------------------------------------------
    def publish_inflight(self, router_id: str, counts: dict[str, tuple[int, ...]], ttl_seconds: float = 2.0) -> None:
        key, now = self.prefix + "inflight:" + router_id, time.time()
        with self.redis.pipeline() as pipe:
            pipe.delete(key)
            if counts:
                pipe.hset(key, mapping={w: ",".join(map(str, c)) for w, c in counts.items()})
                pipe.pexpire(key, int(ttl_seconds * 1000))
            pipe.zadd(self.prefix + "routers", {router_id: now})
            pipe.zremrangebyscore(self.prefix + "routers", "-inf", now - 10 * ttl_seconds)
            pipe.execute()

    def others_inflight(self, router_id: str, ttl_seconds: float = 2.0) -> dict[str, tuple[int, ...]]:
        """The in-flight counts of every other router that wrote them lately, summed per worker."""
        others = [r.decode() for r in self.redis.zrangebyscore(self.prefix + "routers", time.time() - ttl_seconds, "+inf")]
        others = [r for r in others if r != router_id]
        if not others:
            return {}
        with self.redis.pipeline() as pipe:
            for r in others:
                pipe.hgetall(self.prefix + "inflight:" + r)
            tables = pipe.execute()
        total: dict[str, tuple[int, ...]] = {}
        for table in tables:
            for w, v in table.items():
                counts = tuple(int(x) for x in v.decode().split(","))
                prev = total.get(w.decode(), (0,) * len(counts))
                total[w.decode()] = tuple(a + b for a, b in zip(prev, counts))
        return total

    def clear(self) -> None:
        for key in self.redis.scan_iter(match=self.prefix + "*", count=500):
            self.redis.delete(key)


class Heartbeat:
    """A worker's beat: publishes its record with fresh load every `period` seconds and
    tells the worker when it is asked to drain. Redis being away is logged, not fatal."""

    def __init__(
        self,
        registry: Registry,
        record: WorkerRecord,
        load: Callable[[], dict],
        on_drain: Callable[[], None],
        period: float = 1.0,
    ) -> None:
        self.registry = registry
        self.record = record
        self._load = load
        self._on_drain = on_drain
        self._period = period
        self._stop = threading.Event()
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{record.worker_id}", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def beat(self) -> None:
        try:
            self.record.load = self._load()
            if self.record.state == "ready" and self.record.worker_id in self.registry.draining():
                self._on_drain()
            self.registry.publish(self.record)
            if self._down_since is not None:
                logger.info("registry reachable again after %.1f s; re-registered %s", time.monotonic() - self._down_since, self.record.worker_id)
                self._down_since = None
        except redis.RedisError as e:
            if self._down_since is None:
                self._down_since = time.monotonic()
                logger.warning("registry unreachable (%s); will keep trying", e)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.beat()
