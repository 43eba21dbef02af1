"""The router's online predictors converge on synthetic streams, and start from safe priors."""

from __future__ import annotations

import random

from splitserve.router.predictors import OutputLengthModel, PrefillModel, RequestFeatures, TransferModel


def test_prefill_throughput_is_learned_per_worker_and_context_length() -> None:
    m = PrefillModel(prior_tokens_per_s=1000)
    assert m.seconds("p1", 512, 1000) == 1.0  # the prior until something is measured
    rng = random.Random(0)
    for _ in range(200):  # p1: 8,000 tok/s on short prompts, 2,000 tok/s on long ones; +-10 % noise
        m.observe("p1", 500, 400, 400 / (8000 * rng.uniform(0.9, 1.1)))
        m.observe("p1", 8000, 4000, 4000 / (2000 * rng.uniform(0.9, 1.1)))
    assert abs(m.tokens_per_s("p1", 500) - 8000) / 8000 < 0.1
    assert abs(m.tokens_per_s("p1", 8000) - 2000) / 2000 < 0.1
    assert abs(m.tokens_per_s("p2", 500) - 8000) / 8000 < 0.1  # an unmeasured worker: the pool's figure
    for _ in range(50):  # the worker slows down (load): the estimate follows
        m.observe("p1", 500, 400, 400 / 4000)
    assert abs(m.tokens_per_s("p1", 500) - 4000) / 4000 < 0.05


def test_transfer_bandwidth_is_learned_per_pair() -> None:
    m = TransferModel(prior_bytes_per_s=1e8)
    assert m.seconds("p", "d", 10**8) == 1.0
    for _ in range(30):
        m.observe("p", "d", 4 << 20, (4 << 20) / 5e8)
        m.observe("p", "far", 4 << 20, (4 << 20) / 5e7)
    assert abs(m.bytes_per_s("p", "d") - 5e8) / 5e8 < 0.01 and abs(m.bytes_per_s("p", "far") - 5e7) / 5e7 < 0.01


def kendall_tau_b(a: list[float], b: list[float]) -> float:
    """Rank agreement, ties allowed (a predictor that only tells tenants apart ties within one)."""
    pairs = [(a[i] - a[j], b[i] - b[j]) for i in range(len(a)) for j in range(i + 1, len(a))]
    concordant = sum(x * y > 0 for x, y in pairs)
    discordant = sum(x * y < 0 for x, y in pairs)
    untied_a, untied_b = sum(x != 0 for x, _ in pairs), sum(y != 0 for _, y in pairs)
    return (concordant - discordant) / (untied_a * untied_b) ** 0.5


def test_output_lengths_are_learned_from_tenants_and_shapes() -> None:
    """Tenant 1 writes ~40 tokens, tenant 2 ~400; chat answers to long prompts run longer."""
    m = OutputLengthModel(heavy_tokens=256, default_tokens=128)
    f1, f2 = RequestFeatures(300, 1024, tenant=1), RequestFeatures(300, 1024, tenant=2)
    assert m.predict(f1) == 128 and m.predict(RequestFeatures(300, 16, tenant=1)) == 16  # the safe default, capped
    rng = random.Random(1)

    def truth(f: RequestFeatures) -> int:
        return min(f.max_tokens, int((40 if f.tenant == 1 else 400) * rng.uniform(0.8, 1.2)))

    for _ in range(100):
        for f in (f1, f2):
            m.observe(f, truth(f))
    assert abs(m.predict(f1) - 40) <= 6 and abs(m.predict(f2) - 400) <= 60
    assert not m.heavy(f1) and m.heavy(f2)
    test = [RequestFeatures(rng.randrange(50, 2000), 1024, tenant=rng.choice([1, 2])) for _ in range(60)]
    actual = [truth(f) for f in test]
    predicted = [m.predict(f) for f in test]
    assert kendall_tau_b(predicted, actual) > 0.6
    assert sum((p >= 256) == (a >= 256) for p, a in zip(predicted, actual)) / len(test) > 0.95  # heavy/light bucket accuracy
