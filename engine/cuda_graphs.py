"""CUDA graphs for decode steps: one graph per common batch size, replayed instead of launching
every kernel of the forward from Python (at small batches the launches, not the GPU, set the pace).

Life cycle: the engine builds a `DecodeGraphs` on CUDA when `cuda_graphs` is on and the attention
backend can be captured (`supports_cuda_graphs`: FlashInfer, whose decode plan is made on the host
before each replay) -> `capture()` once, before serving: for each size of `graph_batch_sizes`,
largest first, one eager warm-up and one capture of the model's forward (embedding to logits) on
static input buffers, every graph in one memory pool -> each all-decode step with no per-layer hook
and B <= the largest size: `run()` writes the step's inputs into the buffers of the smallest
captured size P >= B (rows B..P-1 repeat row 0: the same token, written to the same slot with the
same bytes, attended and dropped), plans the backend for P, replays, and returns logits [B, V].
Prefill and mixed steps, larger batches and hooked steps run eagerly.

The choice of sizes and whether to capture at all are plain functions, tested on CPU; the
capture and replay run only on CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitserve.engine.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)

# vLLM's choice, more or less: every size up to 8, then steps of 8, then of 16 and 32
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def graph_batch_sizes(max_num_seqs: int, sizes: Sequence[int] = GRAPH_BATCH_SIZES) -> list[int]:
    """The sizes to capture for a scheduler of `max_num_seqs`: the common ones below it, and it."""
    chosen = [s for s in sizes if s < max_num_seqs]
    return [*chosen, max_num_seqs] if max_num_seqs > 0 else []


def padded_size(batch: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size that holds `batch` rows (None: run eagerly)."""
    return next((s for s in sorted(sizes) if s >= batch), None)


def capture_unavailable_reason(enabled: bool, device_type: str, backend: AttentionBackend) -> str | None:
    if not enabled:
        return "cuda_graphs is off"
    if device_type != "cuda":
        return f"CUDA graphs need CUDA (device is {device_type})"
    if not backend.supports_cuda_graphs:
        return f"attention backend {backend.name!r} plans on the device per step and cannot be captured"
    return None


@dataclass
class DecodeStep:
    """One all-decode step, as host lists (one entry per sequence, in batch order)."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]


class DecodeGraphs:
    def __init__(self, model, kv_cache: torch.Tensor, backend: AttentionBackend, block_size: int, sizes: Sequence[int],
                 max_blocks_per_seq: int) -> None:
        self.model, self.kv_cache, self.backend, self.block_size = model, kv_cache, backend, block_size
        self.sizes = sorted(sizes)
        largest, dev = self.sizes[-1], kv_cache.device
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=dev)
        self.positions = torch.zeros(largest, dtype=torch.long, device=dev)
        self.slots = torch.zeros(largest, dtype=torch.long, device=dev)
        self.logits_idx = torch.arange(largest, device=dev)
        self.graph_state = backend.make_graph_state(largest, largest * max_blocks_per_seq)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.metas: dict[int, AttentionMetadata] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def accepts(self, batch: int) -> bool:
        return bool(self.graphs) and padded_size(batch, self.sizes) is not None

    def capture(self) -> None:
        """Capture every size (largest first, so the smaller ones fit in its memory pool)."""
        with torch.cuda.device(self.kv_cache.device):  # streams, pool and graphs on the cache's GPU, whichever is current
            self._capture()

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        first_block = 0  # warm-up and capture write into slot 0 of block 0: any bytes will do, no request owns them yet
        for size in reversed(self.sizes):
            step = DecodeStep([0] * size, [0] * size, [first_block] * size, [1] * size, [[first_block]] * size)
            meta = self._load(step, size)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._forward(meta, size)  # warm-up: lazy initialisation happens outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            # the warm-up memoized the K/V rows of the slots in `meta`: drop them, so that the
            # graph computes them from the slot buffer on every replay
            meta._cache.pop("kv_rows", None)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(meta, size)
            self.graphs[size], self.metas[size] = graph, meta
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def run(self, step: DecodeStep) -> torch.Tensor:  # [B, vocab] float32
        batch = len(step.input_ids)
        size = padded_size(batch, self.sizes)
        assert size is not None and size in self.graphs, f"no graph for {batch} rows"
        self._load(step, size, self.metas[size])
        with torch.cuda.device(self.kv_cache.device):  # the engine's loop thread may have another current device
            self.graphs[size].replay()
        return self.logits[size][:batch]

    def _load(self, step: DecodeStep, size: int, meta: AttentionMetadata | None = None) -> AttentionMetadata:
        """Copy the step (padded to `size` with row 0) into the static buffers and plan the
        backend for it; returns the metadata the graph was (or will be) captured with."""
        pad = size - len(step.input_ids)

        def padded(xs: list) -> list:
            return xs + xs[:1] * pad

        for buf, values in ((self.input_ids, step.input_ids), (self.positions, step.positions), (self.slots, step.slots)):
            buf[:size].copy_(torch.tensor(padded(values), dtype=torch.long), non_blocking=True)
        if meta is None:
            meta = AttentionMetadata(query_start=list(range(size + 1)), context_lens=[], block_tables=[], block_size=self.block_size,
                                     slot_mapping=self.slots[:size], decode_seqs=list(range(size)), prefill_seqs=[],
                                     device=self.kv_cache.device)
        meta.context_lens, meta.block_tables = padded(step.context_lens), padded(step.block_tables)
        self.backend.plan_graph_step(meta, self.graph_state, size, self.model.config, self.kv_cache.dtype)
        return meta

    def _forward(self, meta: AttentionMetadata, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_cache, meta, self.logits_idx[:size], self.backend)
