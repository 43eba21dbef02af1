"""Offline batch generation, in the shape vLLM users know:

    from splitserve.engine import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", dtype="float32")
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))
    outs[0].text, outs[0].token_ids
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine, Prompt, RequestOutput
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import SchedulerConfig

logger = logging.getLogger(__name__)


class LLM:
    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int = 1 << 30,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_prefill_chunk: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        attention_backend: str = "auto",
        linear_kernel: str = "torch",
        num_threads: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        scheduler = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_prefill_chunk=max_prefill_chunk,
            enable_prefix_caching=enable_prefix_caching,
        )
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_model_len=max_model_len,
            seed=seed,
            attention_backend=attention_backend,
            linear_kernel=linear_kernel,
            num_threads=num_threads,
            cuda_graphs=cuda_graphs,
            scheduler=scheduler,
        )
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string or a list of token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError("sampling_params", f"{len(params)} given for {len(prompts)} prompts")

        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                self.engine.add_request(rid, prompt, p)
            return self._run(ids)
        except BaseException:
            for rid in ids:  # leave no request (and no block) behind on error or Ctrl-C
                try:
                    self.engine.abort_request(rid)
                except KeyError:
                    pass
            raise

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        start = last_log = time.monotonic()
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
            now = time.monotonic()
            if now - last_log > 10:
                logger.info("generate: %d/%d requests done after %.0f s", len(done), len(ids), now - start)
                last_log = now
        return [done[rid] for rid in ids]
