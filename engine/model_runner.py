"""Turns one scheduled step into tensors, runs the model and samples.

Owns the KV cache tensor of the whole worker: [layers, num_blocks, 2, block_size, KV heads,
head dim] (the layout named by `KV_LAYOUT`). Other processes read and write it only through
block ids (`read_blocks` / `write_blocks`), never by assuming a memory layout of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from splitserve.engine.attention import AttentionMetadata, get_backend
from splitserve.engine.config import ModelConfig
from splitserve.engine.cuda_graphs import DecodeGraphs, DecodeStep, capture_unavailable_reason
from splitserve.engine.model import LlamaForCausalLM
from splitserve.engine.request import Request
from splitserve.engine.sampler import Sampled, SampleRow, sample
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledRequest, SchedulerOutput

KV_LAYOUT = "L,NB,2,BS,KH,D"


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        attention_backend: str = "auto",
        seed: int = 0,
        mlp_chunk: int | None = None,
        cuda_graph_sizes: Sequence[int] = (),
        max_blocks_per_seq: int = 0,
    ) -> None:
        """`cuda_graph_sizes`: decode batch sizes to capture where the device and backend can
        (engine/cuda_graphs.py); `max_blocks_per_seq` bounds their page tables."""
        self.model = model
        self.config = config
        self.block_size = block_size
        self.mlp_chunk = mlp_chunk
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # zeros, not empty: padded decode reads slots no request wrote, and a NaN there would
        # leak through the masked softmax (0 * NaN = NaN).
        self.kv_cache = torch.zeros(
            (config.num_layers, num_blocks, 2, block_size, config.num_kv_heads, config.head_dim),
            dtype=self.dtype,
            device=self.device,
        )
        self.backend = get_backend(attention_backend, self.device, self.dtype)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.graphs: DecodeGraphs | None = None
        why_not = capture_unavailable_reason(bool(cuda_graph_sizes), self.device.type, self.backend)
        if why_not is None:
            self.graphs = DecodeGraphs(model, self.kv_cache, self.backend, block_size, cuda_graph_sizes, max_blocks_per_seq)
            self.graphs.capture()

    @staticmethod
    def block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return config.num_layers * 2 * block_size * config.num_kv_heads * config.head_dim * dtype.itemsize

    # ---- one step ------------------------------------------------------------------------
    def execute(
        self, out: SchedulerOutput, on_layer_done: Callable[[int], None] | None = None
    ) -> tuple[Sampled, list[int]]:
        """Run the step; returns the sampled tokens (with their logprobs) and the indices (into
        `out.scheduled`) of the requests they belong to."""
        if on_layer_done is None and self.graphs is not None and self._graph_step(out):
            step, sampling = self._decode_step(out)
            logits = self.graphs.run(step)
        else:
            input_ids, positions, meta, logits_idx, sampling = self._prepare(out)
            logits = self.model(input_ids, positions, self.kv_cache, meta, logits_idx, self.backend, on_layer_done, self.mlp_chunk)
        if not sampling:
            return Sampled([], []), []
        eos = self.config.eos_token_ids
        rows = [SampleRow.of(r.params, r.prompt_token_ids, r.output_token_ids, eos) for r in (out.scheduled[i].request for i in sampling)]
        return sample(logits, rows, self.generator), sampling

    def _graph_step(self, out: SchedulerOutput) -> bool:
        """An all-decode step in which every request samples, of a captured size."""
        return self.graphs.accepts(len(out.scheduled)) and all(s.num_new_tokens == 1 and s.will_sample for s in out.scheduled)

    def _decode_step(self, out: SchedulerOutput) -> tuple[DecodeStep, list[int]]:
        bs = self.block_size
        step = DecodeStep([], [], [], [], [])
        for s in out.scheduled:
            r, p = s.request, s.start
            step.input_ids.append(r.prompt_token_ids[p] if p < len(r.prompt_token_ids) else r.output_token_ids[p - len(r.prompt_token_ids)])
            step.positions.append(p)
            step.slots.append(r.block_ids[p // bs] * bs + p % bs)
            step.context_lens.append(p + 1)
            step.block_tables.append(r.block_ids)
        return step, list(range(len(out.scheduled)))

    def score(self, token_ids: list[int], block_ids: list[int]) -> torch.Tensor:
        """Logits [T, vocab] at every position of one sequence written into `block_ids`."""
        request = Request("score", token_ids, SamplingParams(max_tokens=1), block_ids=block_ids)
        out = SchedulerOutput([ScheduledRequest(request, len(token_ids), 0)], [])
        input_ids, positions, meta, _, _ = self._prepare(out)
        every = torch.arange(len(token_ids), device=self.device)
        return self.model(input_ids, positions, self.kv_cache, meta, every, self.backend, None, self.mlp_chunk)

    def _prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[int]]:
        """Host lists -> the step's tensors: input ids, positions, attention metadata, the
        rows whose logits are sampled, and which scheduled requests those rows belong to."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        tables: list[list[int]] = []
        logits_idx: list[int] = []
        sampling: list[int] = []
        decode: list[int] = []
        prefill: list[int] = []
        for i, s in enumerate(out.scheduled):
            r, start, n = s.request, s.start, s.num_new_tokens
            end = start + n
            table = r.block_ids
            if n == 1:  # the common case, without building ranges
                ids.append(r.prompt_token_ids[start] if start < len(r.prompt_token_ids) else r.output_token_ids[start - len(r.prompt_token_ids)])
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                decode.append(i)
            else:
                ids.extend(r.token_slice(start, end))
                pos.extend(range(start, end))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
                prefill.append(i)
            query_start.append(query_start[-1] + n)
            context_lens.append(end)
            tables.append(table)
            if s.will_sample:
                logits_idx.append(query_start[-1] - 1)
                sampling.append(i)
        dev = self.device
        meta = AttentionMetadata(
            query_start=query_start,
            context_lens=context_lens,
            block_tables=tables,
            block_size=bs,
            slot_mapping=torch.tensor(slots, device=dev),
            decode_seqs=decode,
            prefill_seqs=prefill,
            device=dev,
        )
        return (
            torch.tensor(ids, device=dev),
            torch.tensor(pos, device=dev),
            meta,
            torch.tensor(logits_idx, device=dev, dtype=torch.long),
            sampling,
        )

    # ---- KV access for transfers ---------------------------------------------------------
    def read_blocks(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        """A copy of one layer's KV for these blocks: [n, 2, block_size, KH, D]."""
        return self.kv_cache[layer, torch.tensor(block_ids, device=self.device)]

    def write_blocks(self, layer: int, block_ids: list[int], data: torch.Tensor) -> None:
        """Write one layer's KV ([n, 2, block_size, KH, D]) into these blocks."""
        expected = (len(block_ids), *self.kv_cache.shape[2:])
        if tuple(data.shape) != expected:
            raise ValueError(f"KV payload has shape {tuple(data.shape)}, expected {expected}")
        self.kv_cache[layer, torch.tensor(block_ids, device=self.device)] = data.to(self.device, self.dtype)
