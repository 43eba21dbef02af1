"""What the router learns from the requests it serves, to predict the next ones: plain Python.

    PrefillModel   seconds to prefill n uncached tokens of a prompt of c tokens on a worker:
                   throughput learned per (worker, context bucket) from the workers' own
                   reported prefill times, falling back to the pool's, then to a prior
    TransferModel  seconds to move b KV bytes from a prefill to a decode worker: bandwidth
                   learned per pair from measured transfers, with a configured prior
    OutputLengthModel
                   output tokens of a request from features cheap at routing time (prompt
                   length, max_tokens, the prompt's first block = its tenant or system prompt,
                   chat or completion), learned from finished requests, with a safe default;
                   a request predicted to produce at least `heavy_tokens` is "heavy"

Every estimate is an exponentially weighted mean, so the models follow a cluster whose load
or traffic changes. Each model keeps few numbers per key; keys are bounded (LRU).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


class _Ewma:
    """Keyed exponentially weighted means, at most `capacity` keys (least recently updated go)."""

    def __init__(self, alpha: float = 0.2, capacity: int = 4096) -> None:
        self.alpha, self.capacity = alpha, capacity
        self._v: OrderedDict[object, tuple[float, int]] = OrderedDict()  # key -> (mean, observations)

    def add(self, key: object, value: float) -> None:
        mean, n = self._v.pop(key, (value, 0))
        # the first observations weigh more, so a new key converges fast
        a = max(self.alpha, 1.0 / (n + 1))
        self._v[key] = (mean + a * (value - mean), n + 1)
        if len(self._v) > self.capacity:
            self._v.popitem(last=False)

    def get(self, key: object, min_n: int = 1) -> float | None:
        mean, n = self._v.get(key, (0.0, 0))
        return mean if n >= min_n else None


def context_bucket(tokens: int) -> int:
    """Powers of two from 256: prefill throughput falls as the context (and attention) grows."""
    return max(8, math.ceil(math.log2(max(1, tokens))))


class PrefillModel:
    def __init__(self, prior_tokens_per_s: float = 4000.0) -> None:
        self.prior = prior_tokens_per_s
        self._worker = _Ewma()
        self._pool = _Ewma()

    def observe(self, worker: str, context: int, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        b = context_bucket(context)
        self._worker.add((worker, b), tokens / seconds)
        self._pool.add(b, tokens / seconds)

    def tokens_per_s(self, worker: str, context: int) -> float:
        b = context_bucket(context)
        return self._worker.get((worker, b)) or self._pool.get(b) or self.prior

    def seconds(self, worker: str, context: int, tokens: int) -> float:
        return max(0, tokens) / self.tokens_per_s(worker, context)

    @staticmethod
    def overhead_model() -> _Ewma:
        return _Ewma(alpha=0.1)


class TransferModel:
    def __init__(self, prior_bytes_per_s: float = 1e9) -> None:
        self.prior = prior_bytes_per_s
        self._pair = _Ewma()
        self._any = _Ewma()

    def observe(self, prefill: str, decode: str, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        self._pair.add((prefill, decode), nbytes / seconds)
        self._any.add(None, nbytes / seconds)

    def bytes_per_s(self, prefill: str, decode: str) -> float:
        return self._pair.get((prefill, decode)) or self._any.get(None) or self.prior

    def seconds(self, prefill: str, decode: str, nbytes: int) -> float:
        return max(0, nbytes) / self.bytes_per_s(prefill, decode)


@dataclass(frozen=True)
class RequestFeatures:
    prompt_tokens: int
    max_tokens: int
    tenant: int = 0  # the hash of the prompt's first block (0: shorter than a block)
    kind: str = "completion"  # "completion" | "chat"


def _bucket(n: int) -> int:
    return max(0, math.ceil(math.log2(max(1, n))))


class OutputLengthModel:
    """Backs off from the most specific feature key with enough observations to the least."""

    MIN_OBSERVATIONS = 3

    def __init__(self, heavy_tokens: int = 256, default_tokens: int = 128) -> None:
        self.heavy_tokens, self.default_tokens = heavy_tokens, default_tokens
        self._means = _Ewma(alpha=0.1, capacity=16384)

    @staticmethod
    def _keys(f: RequestFeatures) -> list[tuple]:
        m = _bucket(f.max_tokens)
        return [("tenant", f.tenant, f.kind, m), ("shape", f.kind, m, _bucket(f.prompt_tokens)), ("kind", f.kind, m), ("max", m)]

    def observe(self, f: RequestFeatures, output_tokens: int) -> None:
        for key in self._keys(f):
            self._means.add(key, output_tokens)

    def predict(self, f: RequestFeatures) -> int:
        """Predicted output tokens; with nothing learned yet, `default_tokens` (or max_tokens
        when smaller): cautious where it matters, since KV headroom is checked against it."""
        for key in self._keys(f):
            mean = self._means.get(key, self.MIN_OBSERVATIONS)
            if mean is not None:
                return max(1, min(f.max_tokens, round(mean)))
        return min(f.max_tokens, self.default_tokens)

    def heavy(self, f: RequestFeatures) -> bool:
        return self.predict(f) >= self.heavy_tokens
