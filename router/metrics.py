"""Prometheus metrics of the router, named after vLLM's (`splitserve:` for `vllm:`).

One `RouterMetrics` per router holds its own registry, so tests can run several routers in a
process. Per-worker load gauges are read from the cluster view at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from splitserve.cluster.registry import WorkerRecord

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
BYTES_PER_REQUEST_BUCKETS = tuple(float(1 << k) for k in range(10, 36, 2))


class RouterMetrics:
    def __init__(self, workers: Callable[[], list[WorkerRecord]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        p = "splitserve:"
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Request arrival to first token.", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Gap between consecutive tokens of a request.", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request arrival to its last token.", buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(p + "request_queue_time_seconds", "Time a request waited in a prefill worker's queue.", buckets=LATENCY_BUCKETS, registry=r)
        self.prefill = Histogram(p + "request_prefill_time_seconds", "Prefill compute time of a request.", buckets=LATENCY_BUCKETS, registry=r)
        self.route = Histogram(p + "request_route_time_seconds", "Time to choose a (prefill, decode) pair and reserve.", buckets=LATENCY_BUCKETS, registry=r)
        self.kv_seconds = Histogram(p + "kv_transfer_seconds", "KV transfer time of a request (first payload to commit).", buckets=LATENCY_BUCKETS, registry=r)
        self.kv_bytes = Counter(p + "kv_transfer_bytes", "KV bytes moved from prefill to decode workers.", registry=r)
        self.requests = Counter(p + "requests", "Finished requests by outcome.", ["outcome"], registry=r)
        self.retries = Counter(p + "request_retries", "Legs re-dispatched to another worker after a failure.", ["leg"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens.", registry=r)
        self.running = Gauge(p + "num_requests_running", "Requests in flight through this router.", registry=r)
        self.refused = Counter(p + "requests_refused", "Requests refused at admission (reason: slo = predicted TTFT beyond the SLO; overloaded = router.max_concurrent_requests in flight).",
                               ["reason"], registry=r)
        self.paths = Counter(p + "requests_by_path", "Finished requests by path: disaggregated, or prefilled locally on the decode worker.",
                             ["path"], registry=r)
        self.prefix_queries = Counter(p + "prefix_cache_queries", "Prompt tokens looked up in a pool's prefix caches (finished requests).",
                                      ["pool"], registry=r)
        self.prefix_hits = Counter(p + "prefix_cache_hits", "Prompt tokens a pool's prefix caches already held (the hit rate is hits / queries).",
                                   ["pool"], registry=r)
        r.register(_WorkerCollector(workers))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerCollector:
    """Per-worker load, as last published by each worker's heartbeat."""

    FIELDS = {
        "running": "worker_running_requests",
        "waiting": "worker_waiting_requests",
        "queued_prefill_tokens": "worker_queued_prefill_tokens",
        "used_blocks": "worker_kv_blocks_used",
        "free_blocks": "worker_kv_blocks_free",
        "reserved_blocks": "worker_kv_blocks_reserved",
    }

    def __init__(self, workers: Callable[[], list[WorkerRecord]]) -> None:
        self._workers = workers

    def collect(self):
        families = {k: GaugeMetricFamily("splitserve:" + name, f"Per-worker {k.replace('_', ' ')}.", labels=["worker", "role"]) for k, name in self.FIELDS.items()}
        for w in self._workers():
            for key, fam in families.items():
                fam.add_metric([w.worker_id, w.role], float(w.load.get(key, 0)))
        yield from families.values()
