"""Attention over the paged KV cache, behind a small backend interface.

The model hands every layer a packed batch: T query tokens from S sequences laid end to end
(no padding), plus `AttentionMetadata` saying where each sequence's tokens are and which
cache slots they go to. A backend (1) writes the new K/V into their slots and (2) attends
each query to its sequence's context = cached prefix + new tokens, causally.

`TorchAttentionBackend` is the reference: plain PyTorch (SDPA), CPU and CUDA. Longer chunks
(prefill) are attended one sequence at a time, straight from the fresh K/V when nothing is
cached before them. Sequences with one new token (decode) are attended
  * on CPU one sequence at a time, over exactly its context, without a mask: one gather of its
    blocks into a small buffer, read by SDPA while it is still in cache. This is the very SDPA
    call Hugging Face makes for one sequence, so a batch-1 decode matches it bit for bit, and
    nothing is padded (a padded batch gathers up to the longest context for every row);
  * on CUDA in one padded, masked SDPA call over K/V gathered through the block tables (a
    loop of small kernels would cost a launch each). Faster CUDA backends live in
    `attention_cuda.py` and are chosen by `select_backend`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class DecodeSeq:
    """One decoding sequence of the step, as the CPU decode path reads it."""

    token: int  # its row in the packed batch
    context_len: int  # tokens of context including this step's
    # Rows of the layer's cache viewed as [num_blocks * 2, block_size, KH, D]: the K halves of
    # its blocks, then their V halves, so that one index_select gives a K run and a V run,
    # each [n * block_size, KH, D], that SDPA reads as views.
    gather: torch.Tensor  # [2n]


@dataclass
class AttentionMetadata:
    """Where the packed batch's tokens belong. Python lists are for loops on the host,
    tensors live on the model's device. Built once per step by the model runner; the batched
    views (`decode_block_table`, ...) are made on first use, so a path that does not need
    them does not pay for them."""

    query_start: list[int]  # [S + 1] offsets of each sequence's tokens in the batch
    context_lens: list[int]  # [S] tokens of context after this step (cached + new)
    block_tables: list[list[int]]  # [S] block ids of each sequence
    block_size: int
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each new token
    decode_seqs: list[int]  # sequences with exactly one new token
    prefill_seqs: list[int]  # the others
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _cache: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    def _memo(self, key: object, make) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def kv_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] rows of the new tokens' K and V in a layer's cache viewed as
        [num_blocks * 2 * block_size, KH, D] (a block's K half, then its V half)."""

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            bs = self.block_size
            k = self.slot_mapping // bs * (2 * bs) + self.slot_mapping % bs
            return k, k + bs

        return self._memo("kv_rows", make)

    # ---- decode, one sequence at a time (CPU) ------------------------------------------------
    def decode_list(self) -> list[DecodeSeq]:
        def make() -> list[DecodeSeq]:
            out = []
            bs = self.block_size
            for s in self.decode_seqs:
                ctx = self.context_lens[s]
                blocks = self.block_tables[s][: -(-ctx // bs)]
                rows = [2 * b for b in blocks] + [2 * b + 1 for b in blocks]
                out.append(DecodeSeq(self.query_start[s], ctx, torch.tensor(rows, device=self.device)))
            return out

        return self._memo("decode_list", make)

    # ---- decode, batched (CUDA) --------------------------------------------------------------
    @property
    def decode_tokens(self) -> torch.Tensor:  # [Bd] token rows of the decoding sequences
        return self._memo("decode_tokens", lambda: torch.tensor([self.query_start[i] for i in self.decode_seqs], device=self.device))

    @property
    def decode_context_lens(self) -> torch.Tensor:  # [Bd]
        return self._memo("decode_ctx", lambda: torch.tensor([self.context_lens[i] for i in self.decode_seqs], device=self.device))

    @property
    def decode_block_table(self) -> torch.Tensor:  # [Bd, max_blocks] padded with 0
        def make() -> torch.Tensor:
            bs = self.block_size
            width = max((-(-self.context_lens[i] // bs) for i in self.decode_seqs), default=0)
            rows = [self.block_tables[i][:width] + [0] * (width - len(self.block_tables[i][:width])) for i in self.decode_seqs]
            return torch.tensor(rows, device=self.device, dtype=torch.long).view(len(rows), width)

        return self._memo("decode_table", make)

    def decode_mask(self, width: int, sliding_window: int | None) -> torch.Tensor:
        """[Bd, 1, 1, L] visibility of the gathered keys, built once per step and window."""

        def make() -> torch.Tensor:
            pos = torch.arange(width, device=self.device)[None, :]  # [1, L]
            lens = self.decode_context_lens[:, None]  # [Bd, 1]
            mask = pos < lens
            if sliding_window is not None:
                mask &= (lens - 1) - pos < sliding_window
            return mask[:, None, None, :]

        return self._memo(("mask", width, sliding_window), make)


class AttentionBackend(abc.ABC):
    """Writes one layer's new K/V into the paged cache and computes attention outputs.

    `supports_cuda_graphs`: a decode step through this backend reads every shape from the
    metadata's tensors (no host syncs, no per-sequence Python), so it can be captured."""

    name: str = "abstract"
    supports_cuda_graphs: bool = False

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

    # ---- CUDA graphs (engine/cuda_graphs.py), for backends with supports_cuda_graphs ---------
    def make_graph_state(self, max_batch: int, max_pages: int) -> object:
        raise NotImplementedError(f"attention backend {self.name!r} cannot be captured in CUDA graphs")

    def plan_graph_step(self, meta: AttentionMetadata, state: object, size: int, config, kv_dtype: torch.dtype) -> None:
        raise NotImplementedError(f"attention backend {self.name!r} cannot be captured in CUDA graphs")


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store the new tokens' K/V ([T, KH, D]) in their slots of one layer's cache."""
    rows = kv_cache.view(-1, *kv_cache.shape[-2:])  # [num_blocks * 2 * block_size, KH, D]
    k_rows, v_rows = meta.kv_rows()
    rows.index_copy_(0, k_rows, k)
    rows.index_copy_(0, v_rows, v)


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
        write_kv(k, v, kv_cache, meta)
        decode = self._decode_cpu if q.device.type == "cpu" else self._decode_batched
        if not meta.prefill_seqs:  # an all-decode step: tokens are the decode batch, in order
            return decode(q, kv_cache, meta, sliding_window)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for s in meta.prefill_seqs:
            a, b = meta.query_start[s], meta.query_start[s + 1]
            out[a:b] = self._prefill(q[a:b], k[a:b], v[a:b], kv_cache, meta.block_tables[s], meta.context_lens[s], sliding_window)
        if meta.decode_seqs:
            out[meta.decode_tokens] = decode(q[meta.decode_tokens], kv_cache, meta, sliding_window)
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
    def _decode_cpu(
        q: torch.Tensor,  # [Bd, H, D]: the decoding sequences' rows, in order
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        sliding_window: int | None,
    ) -> torch.Tensor:  # [Bd, H, D]
        nb, _, bs, kh, d = kv_cache.shape
        halves = kv_cache.view(nb * 2, bs, kh, d)
        h = q.shape[1]
        outs = []
        for i, seq in enumerate(meta.decode_list()):
            ctx = seq.context_len
            start = 0 if sliding_window is None else max(0, ctx - sliding_window)
            kv = halves.index_select(0, seq.gather)  # [2n, bs, KH, D]: the K run, then the V run
            run = kv.shape[0] // 2 * bs  # tokens in each run
            # [1, KH, L, D] views of the two runs: token stride KH * D, head stride D
            k = kv.as_strided((1, kh, ctx - start, d), (0, d, kh * d, 1), start * kh * d)
            v = kv.as_strided((1, kh, ctx - start, d), (0, d, kh * d, 1), (run + start) * kh * d)
            outs.append(F.scaled_dot_product_attention(q[i].reshape(1, h, 1, d), k, v, enable_gqa=True))  # [1, H, 1, D]
        return torch.cat(outs).view(len(outs), h, d)

    @staticmethod
    def _decode_batched(
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



def get_backend(name: str = "auto", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> AttentionBackend:
    """The attention backend called `name` for `device` and `dtype`; "auto" picks the fastest
    one usable there (`attention_cuda.choose_backend`)."""
    from splitserve.engine.attention_cuda import select_backend

    return select_backend(name, torch.device(device), dtype)
