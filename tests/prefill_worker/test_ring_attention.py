"""Ring attention against full attention: real processes, gloo, float32 inputs.

Each world size runs in one spawn of N processes; every rank checks its own shard against the
full-attention reference computed in float64 from the same seeded inputs.
"""

from __future__ import annotations

import datetime
import math
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from splitserve.prefill_worker.ring_attention import (
    LinkModel,
    Ring,
    attend_block,
    choose_variant,
    merge,
    positions_of,
    ring_attention,
    shard_ranges,
)

TOL = 1e-5
# (heads, kv heads, new tokens T, cached tokens P)
CASES = [(4, 4, 64, 0), (8, 2, 61, 0), (8, 2, 48, 37), (4, 1, 97, 130), (8, 2, 5, 0)]


def reference(q, k, v, q_pos, k_pos, scale):
    """Full attention in float64: out [T, H, D], lse [T, H]."""
    h, kh = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(h // kh, dim=1)
    v = v.double().repeat_interleave(h // kh, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    s = s.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # [H, T]
    out = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)
    return out, lse.T


def _rank_main(rank: int, world: int, port: int, errors) -> None:
    try:
        store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
        ring = Ring(dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=60)), rank, world)
        for case, (h, kh, t, p) in enumerate(CASES):
            g = torch.Generator().manual_seed(case)
            d = 16
            q = torch.randn(t, h, d, generator=g)
            k = torch.randn(p + t, kh, d, generator=g)
            v = torch.randn(p + t, kh, d, generator=g)
            pos = torch.arange(p + t)
            ref_out, ref_lse = reference(q, k, v, pos[p:], pos, d**-0.5)
            mine = shard_ranges(t, world)[rank]  # new tokens, load-balanced
            cached = [(p * rank // world, p * (rank + 1) // world)]  # this rank's shard of the cache
            q_idx = positions_of(mine)
            kv_idx = torch.cat([positions_of(cached), positions_of(mine, p)])
            for variant in ("pass_kv", "pass_q"):
                out, lse = ring_attention(ring, q[q_idx], k[kv_idx], v[kv_idx], q_idx + p, kv_idx, d**-0.5, variant)
                err_o = (out.double() - ref_out[q_idx]).abs().max().item() if len(q_idx) else 0.0
                err_l = (lse.double() - ref_lse[q_idx]).abs().max().item() if len(q_idx) else 0.0
                if not (err_o <= TOL and err_l <= TOL):
                    errors.append(f"N={world} rank={rank} case={(h, kh, t, p)} {variant}: out err {err_o:.2e}, lse err {err_l:.2e}")
                elif rank == 0:
                    errors.append(f"ok N={world} case={(h, kh, t, p)} {variant}: out err {err_o:.1e}, lse err {err_l:.1e}")
    except Exception:
        errors.append(f"N={world} rank={rank} crashed:\n{traceback.format_exc()}")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_attention_equals_full_attention(world: int) -> None:
    from splitserve.cluster.redis_server import free_port

    with mp.Manager() as manager:
        errors = manager.list()
        mp.start_processes(_rank_main, args=(world, free_port(), errors), nprocs=world, join=True, start_method="spawn")
        results = list(errors)
    failures = [e for e in results if not e.startswith("ok")]
    assert not failures, "\n".join(failures)
    assert len([e for e in results if e.startswith("ok")]) == 2 * len(CASES)


def test_shards_are_balanced_block_aligned_and_cover_everything() -> None:
    for n_tokens, world, bs in [(100, 2, 1), (8000, 4, 16), (33, 3, 16), (5, 4, 16)]:
        ranges = shard_ranges(n_tokens, world, bs)
        covered = sorted(x for r in ranges for a, b in r for x in range(a, b))
        assert covered == list(range(n_tokens))
        for r in ranges:
            for a, b in r:
                assert a % bs == 0 and (b % bs == 0 or b == n_tokens)
        if n_tokens >= 2 * world * bs * 4:
            work = [sum(b * (b + 1) // 2 - a * (a + 1) // 2 for a, b in r) for r in ranges]  # causal work ~ sum of positions
            assert max(work) / min(work) < 1.1


def test_merge_of_two_halves_is_the_whole() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(7, 4, 8, generator=g), torch.randn(20, 2, 8, generator=g), torch.randn(20, 2, 8, generator=g)
    qp, kp = torch.arange(13, 20), torch.arange(20)
    whole = attend_block(q, k, v, qp, kp, 0.3)
    a = attend_block(q, k[:9], v[:9], qp, kp[:9], 0.3)
    b = attend_block(q, k[9:], v[9:], qp, kp[9:], 0.3)
    merged = merge(*a, *b)
    torch.testing.assert_close(merged[0], whole[0])
    torch.testing.assert_close(merged[1], whole[1])


def test_variant_choice_follows_the_cost_model() -> None:
    shape = dict(world=4, heads=32, kv_heads=8, head_dim=128, elem_bytes=2)
    slow = LinkModel(flops=4e14, bandwidth=1e9)
    assert choose_variant(new=131072, cached=0, link=slow, **shape) == "pass_kv"  # long fresh prefill: KV hides behind compute
    assert choose_variant(new=256, cached=131072, link=slow, **shape) == "pass_q"  # mostly cached: queries are smaller
    assert choose_variant(new=100, cached=0, world=1, heads=8, kv_heads=8, head_dim=64, elem_bytes=2) == "pass_kv"


class _Posted:
    """A process group that only records the point-to-point operations posted on it, in order."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, int]] = []

    def send(self, tensors, peer: int, tag: int):
        self.ops.append(("send", peer))
        return self

    def recv(self, tensors, peer: int, tag: int):
        tensors[0].zero_()
        self.ops.append(("recv", peer))
        return self

    def allgather(self, outs, ins):
        for o in outs[0]:
            o.copy_(ins[0])
        return self

    def wait(self) -> None:
        pass


@pytest.mark.parametrize("variant", ["pass_kv", "pass_q"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_pair_posts_sends_against_receives_in_order(variant: str, world: int) -> None:
    """NCCL runs a pair's operations in the order each side posts them and a send waits for its
    receive: the i-th operation one rank posts to a peer must be the opposite of the i-th that
    peer posts back, or the two wait on each other (gloo would not show it)."""
    q, k, v = torch.randn(8, 2, 4), torch.randn(8, 1, 4), torch.randn(8, 1, 4)
    pos = torch.arange(8)
    posted = {r: _Posted() for r in range(world)}
    for r in range(world):
        ring_attention(Ring(posted[r], r, world), q, k, v, pos, pos, 0.5, variant)
    assert all(posted[r].ops for r in range(world))
    for a in range(world):
        for b in range(a + 1, world):  # (pass-KV: only neighbours talk)
            a_to_b = [op for op, peer in posted[a].ops if peer == b]
            b_to_a = [op for op, peer in posted[b].ops if peer == a]
            assert len(a_to_b) == len(b_to_a)
            assert all(x != y for x, y in zip(a_to_b, b_to_a)), (a, b, a_to_b, b_to_a)
