"""Exact ring attention for context-parallel prefill (forward only), in two variants.

N ranks share a sequence of T new tokens (after P tokens whose K/V is already cached,
sharded over the ranks too). The new tokens are cut into 2N chunks; rank i holds chunks i and
2N-1-i, so every rank has the same amount of causal work. Chunk edges fall on KV-block edges,
so each rank owns whole blocks of the cache it ships to the decode worker.

- pass-KV: each rank's K/V (cached shard + new tokens, with positions) travels round the ring;
  each rank attends its queries to the block in hand while the next block is in flight.
- pass-Q: queries travel instead (cheaper when most of the context is cached: Q is smaller
  than K/V then); partial outputs go back to their owners with an all-to-all.
Partial outputs are merged exactly with their log-sum-exp, in float32. Masks come from
global positions (key position <= query position), so any sharding is exact. Only K/V heads
travel (GQA/MQA); the score matrix exists only per (query chunk, key block), never whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

Ranges = list[tuple[int, int]]  # [start, end) token ranges, in order


def shard_ranges(num_tokens: int, world: int, block_size: int = 1) -> list[Ranges]:
    """Per rank, its two token ranges of the load-balanced 2N-chunk split; chunk edges are
    multiples of `block_size` (the last chunk ends at `num_tokens`)."""
    blocks = -(-num_tokens // block_size)
    chunks = 2 * world
    edges = [min(num_tokens, (blocks * c // chunks) * block_size) for c in range(chunks + 1)]
    edges[-1] = num_tokens
    return [[(edges[i], edges[i + 1]), (edges[chunks - 1 - i], edges[chunks - i])] for i in range(world)]


def positions_of(ranges: Ranges, offset: int = 0) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges] or [torch.empty(0, dtype=torch.long)]) + offset


# ---- one block of attention, and merging --------------------------------------------------
def attend_block(
    q: torch.Tensor,  # [Tq, H, D]
    k: torch.Tensor,  # [Tk, KH, D]
    v: torch.Tensor,  # [Tk, KH, D]
    q_pos: torch.Tensor,  # [Tq]
    k_pos: torch.Tensor,  # [Tk]
    scale: float,
    q_chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:  # out [Tq, H, D] float32, lse [Tq, H] float32
    tq, h, d = q.shape
    kh = k.shape[1]
    g = h // kh
    out = torch.zeros(tq, h, d, dtype=torch.float32, device=q.device)
    lse = torch.full((tq, h), -math.inf, dtype=torch.float32, device=q.device)
    if tq == 0 or k.shape[0] == 0:
        return out, lse
    kf = k.float().permute(1, 0, 2).unsqueeze(1)  # [KH, 1, Tk, D]
    vf = v.float().permute(1, 0, 2).unsqueeze(1)
    for a in range(0, tq, q_chunk):
        b = min(tq, a + q_chunk)
        qp = q_pos[a:b]
        keep = k_pos <= qp.max()  # keys after every query of the chunk cost nothing
        if not bool(keep.any()):
            continue
        kc, vc, kp = (kf, vf, k_pos) if bool(keep.all()) else (kf[:, :, keep], vf[:, :, keep], k_pos[keep])
        qf = q[a:b].float().view(b - a, kh, g, d).permute(1, 2, 0, 3)  # [KH, G, n, D]
        s = torch.matmul(qf, kc.transpose(-1, -2)).mul_(scale)  # [KH, G, n, Tk']; in place from here: s is the big one
        s.masked_fill_(kp[None, :] > qp[:, None], -math.inf)
        m = s.amax(dim=-1, keepdim=True).clamp_min_(-1e30)  # rows with nothing visible stay finite
        p = s.sub_(m).exp_()
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, vc).div_(denom.clamp_min(1e-30))  # [KH, G, n, D]
        l = (m + torch.log(denom)).squeeze(-1)  # [KH, G, n]; -inf where nothing visible
        out[a:b] = o.permute(2, 0, 1, 3).reshape(b - a, h, d)
        lse[a:b] = l.permute(2, 0, 1).reshape(b - a, h)
    return out, lse


def merge(out: torch.Tensor, lse: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets into the attention over both."""
    m = torch.maximum(lse, lse2)
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(lse - safe), torch.exp(lse2 - safe)
    total = w1 + w2
    merged = (out * w1[..., None] + out2 * w2[..., None]) / total.clamp_min(1e-30)[..., None]
    return merged, torch.where(total > 0, safe + torch.log(total), m)


# ---- the ring -----------------------------------------------------------------------------
def receives_first(rank: int, peer: int) -> bool:
    """Whether `rank` posts its receives from `peer` before its sends to it: the higher rank of
    a pair does. NCCL runs a pair's point-to-point operations in the order each side posts
    them, and a send waits for its receive, so if both sides sent first neither would get to
    receiving. (gloo does not care.)"""
    return rank > peer


@dataclass
class Ring:
    """A process group seen as a ring: this rank, the world size, and its neighbours."""

    pg: dist.ProcessGroup
    rank: int
    world: int
    device: torch.device = torch.device("cpu")  # where the group's tensors live (NCCL: a GPU)

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world

    def all_sizes(self, n: int) -> list[int]:
        """Every rank's `n` (sizes of what each will send)."""
        device = self.device
        out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world)]
        self.pg.allgather([out], [torch.tensor([n], dtype=torch.int64, device=device)]).wait()
        return [int(t.item()) for t in out]

    def shift(self, tensors: Sequence[torch.Tensor], shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype]):
        """Start sending `tensors` to the next rank and receiving same-kind tensors of
        `shapes` from the previous one; returns (received, wait) — call wait() before use."""
        recv = [torch.empty(s, dtype=dt, device=t.device) for s, dt, t in zip(shapes, dtypes, tensors)]
        works = self.exchange(self.next, [t.contiguous() for t in tensors], self.prev, recv, tags=range(len(tensors)))
        return recv, lambda: [w.wait() for w in works]

    def exchange(self, to: int, sends: Sequence[torch.Tensor], frm: int, recvs: Sequence[torch.Tensor], tags: Sequence[int]) -> list:
        """Post sends[i] to rank `to` and receives[i] from rank `frm` (tag tags[i]) in the order
        NCCL needs (receives_first; with two ranks, or frm == to, it is one pair); returns the works."""
        out = [(self.pg.send, t, to, tag) for t, tag in zip(sends, tags)]
        back = [(self.pg.recv, t, frm, tag) for t, tag in zip(recvs, tags)]
        return [post([t], peer, tag) for post, t, peer, tag in (back + out if receives_first(self.rank, to) else out + back)]


def ring_pass_kv(ring: Ring, q, k, v, q_pos, k_pos, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Local queries against every rank's K/V; K/V rotate, the next block in flight while the
    current one is attended. Returns (out, lse) for the local queries."""
    sizes = ring.all_sizes(k.shape[0])
    held = (k, v, k_pos)
    out = lse = None
    for step in range(ring.world):
        pending = None
        if step < ring.world - 1:
            n = sizes[(ring.rank - step - 1) % ring.world]
            pending = ring.shift(held, [(n, *k.shape[1:]), (n, *v.shape[1:]), (n,)], [k.dtype, v.dtype, k_pos.dtype])
        o2, l2 = attend_block(q, held[0], held[1], q_pos, held[2], scale)
        out, lse = (o2, l2) if out is None else merge(out, lse, o2, l2)
        if pending is not None:
            pending[1]()
            held = tuple(pending[0])
    return out, lse


def ring_pass_q(ring: Ring, q, k, v, q_pos, k_pos, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's queries against local K/V, rotating Q; partial results return to their
    owners by an all-to-all, then merge."""
    sizes = ring.all_sizes(q.shape[0])
    partial: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    held, owner = (q, q_pos), ring.rank
    for step in range(ring.world):
        pending = None
        if step < ring.world - 1:
            n = sizes[(ring.rank - step - 1) % ring.world]
            pending = ring.shift(held, [(n, *q.shape[1:]), (n,)], [q.dtype, q_pos.dtype])
        partial[owner] = attend_block(held[0], k, v, held[1], k_pos, scale)
        if pending is not None:
            pending[1]()
            held, owner = tuple(pending[0]), (owner - 1) % ring.world
    # all-to-all: send each partial (out, lse) to the rank whose queries they are
    works, received = [], []
    for other in range(ring.world):
        if other == ring.rank:
            continue
        o, l = partial[other]
        ro = torch.empty(q.shape[0], *q.shape[1:], dtype=torch.float32, device=q.device)
        rl = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
        works += ring.exchange(other, [o.contiguous(), l.contiguous()], other, [ro, rl], tags=(100, 101))
        received.append((ro, rl))
    for w in works:
        w.wait()
    out, lse = partial[ring.rank]
    for ro, rl in received:
        out, lse = merge(out, lse, ro, rl)
    return out, lse


# ---- choosing the variant -----------------------------------------------------------------
@dataclass(frozen=True)
class LinkModel:
    """What the choice between pass-KV and pass-Q depends on besides the shapes."""

    flops: float = 5e11  # attainable attention FLOP/s of one rank
    bandwidth: float = 5e9  # bytes/s between neighbouring ranks


def choose_variant(new: int, cached: int, world: int, heads: int, kv_heads: int, head_dim: int, elem_bytes: int, link: LinkModel = LinkModel()) -> str:
    """'pass_kv' or 'pass_q' for T=`new` tokens after P=`cached`, from the cost model behind the
    paper's Algorithm 5: per ring step, pass-KV ships 2(T+P)/N tokens of K/V, pass-Q ships T/N
    queries and later all-to-alls their float32 partial outputs; whatever the step's attention
    compute cannot hide is exposed. Fewer exposed seconds wins (ties go to pass-KV)."""
    if world == 1:
        return "pass_kv"
    t, n = new / world, (new + cached) / world
    compute = 4 * t * n * heads * head_dim / link.flops
    kv = 2 * n * kv_heads * head_dim * elem_bytes / link.bandwidth
    qs = t * heads * head_dim * elem_bytes / link.bandwidth
    a2a = (world - 1) * t * heads * (head_dim + 1) * 4 / link.bandwidth  # N-1 partial (out, lse) of t queries each
    exposed_kv = (world - 1) * max(0.0, kv - compute)
    exposed_q = (world - 1) * max(0.0, qs - compute) + a2a
    return "pass_kv" if exposed_kv <= exposed_q else "pass_q"


def ring_attention(ring: Ring, q, k, v, q_pos, k_pos, scale: float, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    if variant == "pass_kv":
        return ring_pass_kv(ring, q, k, v, q_pos, k_pos, scale)
    if variant == "pass_q":
        return ring_pass_q(ring, q, k, v, q_pos, k_pos, scale)
    raise ValueError(f"variant must be 'pass_kv' or 'pass_q', got {variant!r}")
