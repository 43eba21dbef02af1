"""Attention over the paged KV cache, behind a small backend interface.

The model hands every layer a packed batch: T query tokens from S sequences laid end to end
(no padding), plus `AttentionMetadata` saying where each sequence's tokens are and which
cache slots they go to. A backend (1) writes the new K/V into their slots and (2) attends
each query to its sequence's context = cached prefix + new tokens, causally.

`TorchAttentionBackend` is the reference: plain PyTorch (SDPA), CPU and CUDA. Sequences with
one new token (decode) are batched into one padded SDPA call over K/V gathered through their
block tables; longer chunks (prefill) are attended one sequence at a time, straight from the
fresh K/V when nothing is cached before them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where the packed batch's tokens belong. Python lists are for loops on the host,
    tensors live on the model's device."""

    query_start: list[int]  # [S + 1] offsets of each sequence's tokens in the batch
    context_lens: list[int]  # [S] tokens of context after this step (cached + new)
    slot_blocks: torch.Tensor  # [T] block id each new token's K/V goes to
    slot_offsets: torch.Tensor  # [T] offset within that block
    block_tables: list[list[int]]  # [S] block ids of each sequence
    decode_seqs: list[int]  # sequences with exactly one new token
    decode_tokens: torch.Tensor  # [Bd] their token index in the batch
    decode_block_table: torch.Tensor  # [Bd, max_blocks] padded with 0
    decode_context_lens: torch.Tensor  # [Bd]
    prefill_seqs: list[int]  # the others
    _masks: dict = field(default_factory=dict)

    def decode_mask(self, width: int, sliding_window: int | None) -> torch.Tensor:
        """[Bd, 1, 1, L] visibility of the gathered keys, built once per step and window."""
        key = (width, sliding_window)
        if key not in self._masks:
            pos = torch.arange(width, device=self.decode_context_lens.device)[None, :]  # [1, L]
            lens = self.decode_context_lens[:, None]  # [Bd, 1]
            mask = pos < lens
            if sliding_window is not None:
                mask &= (lens - 1) - pos < sliding_window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]


class AttentionBackend(abc.ABC):
    """Writes one layer's new K/V into the paged cache and computes attention outputs."""

    name: str = "abstract"

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KH, D]
        v: torch.Tensor,  # [T, KH, D]
        kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, KH, D] for this layer
        meta: AttentionMetadata,
        sliding_window: int | None,
    ) -> torch.Tensor:  # [T, H, D]
        ...


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        sliding_window: int | None,
    ) -> torch.Tensor:
        kv_cache[meta.slot_blocks, 0, meta.slot_offsets] = k
        kv_cache[meta.slot_blocks, 1, meta.slot_offsets] = v
        if not meta.prefill_seqs:  # an all-decode step: tokens are the decode batch, in order
            return self._decode(q, kv_cache, meta, sliding_window)
        out = torch.empty_like(q)
        for s in meta.prefill_seqs:
            a, b = meta.query_start[s], meta.query_start[s + 1]
            out[a:b] = self._prefill(q[a:b], k[a:b], v[a:b], kv_cache, meta.block_tables[s], meta.context_lens[s], sliding_window)
        if meta.decode_seqs:
            out[meta.decode_tokens] = self._decode(q[meta.decode_tokens], kv_cache, meta, sliding_window)
        return out

    @staticmethod
    def _prefill(
        q: torch.Tensor,  # [n, H, D]
        k: torch.Tensor,  # [n, KH, D]
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        block_table: list[int],
        context_len: int,
        sliding_window: int | None,
    ) -> torch.Tensor:
        n = q.shape[0]
        if context_len > n:  # a cached prefix precedes these tokens: read K/V from the cache
            block_size = kv_cache.shape[2]
            blocks = torch.tensor(block_table[: -(-context_len // block_size)], device=q.device)
            kv = kv_cache[blocks]  # [nb, 2, bs, KH, D]
            k = kv[:, 0].flatten(0, 1)[:context_len]
            v = kv[:, 1].flatten(0, 1)[:context_len]
        mask = None
        if context_len > n or sliding_window is not None:
            q_pos = torch.arange(context_len - n, context_len, device=q.device)[:, None]
            k_pos = torch.arange(context_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= q_pos - k_pos < sliding_window
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, H, n, D]
            k.transpose(0, 1).unsqueeze(0),  # [1, KH, ctx, D]
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)  # [n, H, D]

    @staticmethod
    def _decode(
        q: torch.Tensor,  # [Bd, H, D]
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        sliding_window: int | None,
    ) -> torch.Tensor:
        # K and V gathered separately: one copy each, and the flatten below stays a view
        k = kv_cache[:, 0][meta.decode_block_table].flatten(1, 2).transpose(1, 2)  # [Bd, KH, L, D]
        v = kv_cache[:, 1][meta.decode_block_table].flatten(1, 2).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [Bd, H, 1, D]
            k,
            v,
            attn_mask=meta.decode_mask(k.shape[2], sliding_window),
            enable_gqa=True,
        )
        return out[:, :, 0]  # [Bd, H, D]


def get_backend(name: str) -> AttentionBackend:
    """The attention backend called `name`. Only the reference backend ships today; flash-attn
    or flashinfer backends slot in here on CUDA when installed."""
    backends = {"torch": TorchAttentionBackend}
    if name not in backends:
        raise ValueError(f"attention_backend must be one of {sorted(backends)}, got {name!r}")
    return backends[name]()
