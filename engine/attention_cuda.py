"""Attention backends for CUDA (FlashInfer, flash-attn) and which backend a device gets.

Choice ("auto"): on CUDA in bfloat16/float16, FlashInfer when it is importable (paged decode
and paged, chunked prefill straight from the cache, whose per-layer layout
[num_blocks, 2, block_size, KH, D] is FlashInfer's "NHD" paged layout as it is), else
flash-attn when importable (varlen prefill; paged decode where its kernels accept the block
size), else the SDPA reference backend. On CPU, and for float32 anywhere, always SDPA: the
fused kernels do not take float32, and on CPU there are none. A backend asked for by name on
a device that cannot run it is an error naming what is missing, never a silent fallback.

Neither package is a dependency (both are in the `cuda` extra): a backend loads its kernel
package by name (`KERNELS`, which also says the distribution that provides it) when it is built,
and it is built only where it was chosen. The choice itself (`choose_backend`) is plain Python
and tested on CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import torch

from splitserve.engine.attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend, write_kv
from splitserve.engine.config import ATTENTION_BACKENDS as BACKENDS

# "auto" tries these in order; the first usable one wins
PREFERENCE = ("flashinfer", "flash_attn", "torch")
# backend -> (its kernel module, the distribution that provides it: pyproject.toml's `cuda` extra)
KERNELS = {"flashinfer": ("flashinfer", "flashinfer-python"), "flash_attn": ("flash_attn", "flash-attn")}
# flash-attn's paged kernels take page (block) sizes that are multiples of this
FLASH_ATTN_PAGE_MULTIPLE = 256


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def kernels(backend: str):
    """The kernel package of an optional backend, imported where the backend is built."""
    return importlib.import_module(KERNELS[backend][0])


def unusable_reason(name: str, device_type: str, dtype: torch.dtype, is_importable: Callable[[str], bool] = importable) -> str | None:
    """Why backend `name` cannot run here, or None if it can."""
    if name == "torch":
        return None
    if device_type != "cuda":
        return f"{name} runs on CUDA only (device is {device_type})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{name} takes float16 or bfloat16 (dtype is {str(dtype).removeprefix('torch.')})"
    module, distribution = KERNELS[name]
    if not is_importable(module):
        return f"{name} is not installed (no module {module!r}; pip install {distribution}, or splitserve[cuda])"
    return None


def choose_backend(name: str, device_type: str, dtype: torch.dtype, is_importable: Callable[[str], bool] = importable) -> str:
    """The backend to build for `name` ("auto" or a backend) on this device and dtype."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {list(BACKENDS)}, got {name!r}")
    if name == "auto":
        return next(n for n in PREFERENCE if unusable_reason(n, device_type, dtype, is_importable) is None)
    reason = unusable_reason(name, device_type, dtype, is_importable)
    if reason is not None:
        raise ValueError(f"attention_backend {name!r} cannot run here: {reason}")
    return name


def select_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> AttentionBackend:
    chosen = choose_backend(name, device.type, dtype)
    if chosen == "flashinfer":
        return FlashInferBackend(device)
    if chosen == "flash_attn":
        return FlashAttnBackend()
    return TorchAttentionBackend()


class FlashInferBackend(AttentionBackend):
    """FlashInfer over the paged cache: one plan per step (and sliding window), shared by
    every layer; all-decode steps use the decode kernels, others the prefill kernels, which
    read a cached prefix from the same pages."""

    name = "flashinfer"
    supports_cuda_graphs = True  # decode plans on the host (`plan_graph_step`), the kernels read fixed buffers

    def __init__(self, device: torch.device) -> None:
        self._fi = kernels(self.name)
        # the kernels' scratch space (FlashInfer's examples use 128 MiB)
        self._workspace = torch.empty(128 << 20, dtype=torch.uint8, device=device)
        # one wrapper per (kind, sliding window): a wrapper holds one plan, and layers with
        # different windows in one step need theirs side by side
        self._wrappers: dict[tuple[str, int | None], object] = {}

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
        wrapper = self._plan(meta, q, kv_cache, sliding_window)
        return wrapper.run(q, kv_cache)

    def _plan(self, meta: AttentionMetadata, q: torch.Tensor, kv_cache: torch.Tensor, sliding_window: int | None):
        """Plan once per step and window (the metadata object lives for one step)."""
        key = ("flashinfer", sliding_window)
        if key in meta._cache:
            return meta._cache[key]
        bs = meta.block_size
        indptr, indices, last = (torch.tensor(x, dtype=torch.int32, device=q.device) for x in _paged_kv(meta))
        _, _, _, kh, d = kv_cache.shape
        window = _window_left(sliding_window)
        if not meta.prefill_seqs:
            wrapper = self._wrapper("decode", sliding_window)
            wrapper.plan(indptr, indices, last, q.shape[1], kh, d, bs, window_left=window, q_data_type=q.dtype, kv_data_type=kv_cache.dtype)
        else:
            qo = torch.tensor(meta.query_start, dtype=torch.int32, device=q.device)
            wrapper = self._wrapper("prefill", sliding_window)
            wrapper.plan(qo, indptr, indices, last, q.shape[1], kh, d, bs, causal=True, window_left=window,
                         q_data_type=q.dtype, kv_data_type=kv_cache.dtype)
        meta._cache[key] = wrapper
        return wrapper

    def _wrapper(self, kind: str, sliding_window: int | None):
        key = (kind, sliding_window)
        if key not in self._wrappers:
            make = self._fi.BatchDecodeWithPagedKVCacheWrapper if kind == "decode" else self._fi.BatchPrefillWithPagedKVCacheWrapper
            self._wrappers[key] = make(self._workspace, "NHD")
        return self._wrappers[key]

    # ---- CUDA graphs (engine/cuda_graphs.py) -------------------------------------------------
    def make_graph_state(self, max_batch: int, max_pages: int) -> dict:
        """Fixed page-table buffers that captured decode kernels read, and a wrapper per
        (batch size, sliding window), made on first plan."""
        dev = self._workspace.device
        return {"indptr": torch.zeros(max_batch + 1, dtype=torch.int32, device=dev),
                "indices": torch.zeros(max_pages, dtype=torch.int32, device=dev),
                "last": torch.zeros(max_batch, dtype=torch.int32, device=dev), "wrappers": {}}

    def plan_graph_step(self, meta: AttentionMetadata, state: dict, size: int, config, kv_dtype: torch.dtype) -> None:
        """Plan an all-decode step of `size` rows for replay: the plan lands in the fixed
        buffers, and `forward` finds the wrapper already planned in `meta`."""
        indptr, indices, last = _paged_kv(meta)
        for window in set(config.sliding_windows):
            key = (size, window)
            wrapper = state["wrappers"].get(key)
            if wrapper is None:
                wrapper = state["wrappers"][key] = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                    self._workspace, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=state["indptr"][: size + 1],
                    paged_kv_indices_buffer=state["indices"], paged_kv_last_page_len_buffer=state["last"][:size])
            wrapper.plan(torch.tensor(indptr, dtype=torch.int32), torch.tensor(indices, dtype=torch.int32), torch.tensor(last, dtype=torch.int32),
                         config.num_heads, config.num_kv_heads, config.head_dim, meta.block_size, window_left=_window_left(window),
                         q_data_type=kv_dtype, kv_data_type=kv_dtype)
            meta._cache[("flashinfer", window)] = wrapper


def _paged_kv(meta: AttentionMetadata) -> tuple[list[int], list[int], list[int]]:
    """FlashInfer's page table of a step: indptr [S + 1], page ids, tokens in each last page [S]."""
    bs = meta.block_size
    pages = [t[: -(-c // bs)] for t, c in zip(meta.block_tables, meta.context_lens)]
    indptr = [0, *_cumsum(len(p) for p in pages)]
    return indptr, [b for p in pages for b in p], [c - (len(p) - 1) * bs for p, c in zip(pages, meta.context_lens)]


def _window_left(sliding_window: int | None) -> int:
    return -1 if sliding_window is None else sliding_window - 1  # FlashInfer counts the query's own key apart


class FlashAttnBackend(AttentionBackend):
    """flash-attn: varlen prefill straight from the fresh K/V of prompts with nothing cached
    before them; paged decode and paged prefill through the block tables where the block
    size is a multiple of 256 (flash-attn's paged kernels need it); the SDPA reference for
    the rest, so every step stays exact in what it computes."""

    name = "flash_attn"

    def __init__(self) -> None:
        flash_attn = kernels(self.name)
        self._varlen = flash_attn.flash_attn_varlen_func
        self._with_kvcache = flash_attn.flash_attn_with_kvcache
        self._fallback = TorchAttentionBackend()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        sliding_window: int | None,
    ) -> torch.Tensor:
        window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        paged = meta.block_size % FLASH_ATTN_PAGE_MULTIPLE == 0
        fresh = all(meta.context_lens[s] == meta.query_start[s + 1] - meta.query_start[s] for s in range(len(meta.context_lens)))
        if not meta.decode_seqs and fresh:  # only whole prompts: attend the fresh K/V, then store them
            write_kv(k, v, kv_cache, meta)
            cu = torch.tensor(meta.query_start, dtype=torch.int32, device=q.device)
            longest = max(b - a for a, b in zip(meta.query_start, meta.query_start[1:]))
            return self._varlen(q, k, v, cu, cu, longest, longest, causal=True, window_size=window)
        if not meta.prefill_seqs and paged:  # all decode, pages flash-attn can read
            write_kv(k, v, kv_cache, meta)
            table = meta.decode_block_table.to(torch.int32)
            lens = meta.decode_context_lens.to(torch.int32)
            out = self._with_kvcache(q.unsqueeze(1), kv_cache[:, 0], kv_cache[:, 1], cache_seqlens=lens, block_table=table,
                                     causal=True, window_size=window)
            return out[:, 0]  # [Bd, H, D]
        return self._fallback.forward(q, k, v, kv_cache, meta, sliding_window)


def _cumsum(values) -> list[int]:
    out, total = [], 0
    for x in values:
        total += x
        out.append(total)
    return out

