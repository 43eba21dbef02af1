"""The step-level engine both worker pools run.

A request's life here:
    add_request -> scheduler WAITING -> RUNNING (prefill chunks, then one token a step)
        -> FINISHED (stop / length / abort), blocks freed into the prefix cache.
Disaggregation uses the two halves:
    prefill side:  add_request(prefill_only=True) ... step() until its output says
                   PREFILL_DONE: the first token is sampled and the prompt's KV sits in
                   `output.kv_block_ids` (held) until `release(request_id)`;
    decode side:   reserve(request_id, n) -> block ids; someone writes the prompt's KV into
                   them (`write_kv`); admit_prefilled(...) puts the request into the running
                   batch with that KV as if this engine had computed it.
`step()` is schedule -> execute -> update.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from splitserve.engine.block_pool import BlockPool, block_hashes
from splitserve.engine.config import EngineConfig
from splitserve.engine.cpu_linear import use_linear_kernel
from splitserve.engine.cuda_graphs import graph_batch_sizes
from splitserve.engine.errors import (
    ContextLengthExceededError,
    DuplicateRequestError,
    InvalidRequestError,
    KVCapacityError,
    UnknownRequestError,
)
from splitserve.engine.loader import load_model, resolve_dtype
from splitserve.engine.model_runner import KV_LAYOUT, ModelRunner
from splitserve.engine.prompt import Prompt, check_fits, check_token_ids, encode_prompt
from splitserve.engine.request import FinishReason, Request
from splitserve.engine.sampler import Sampled
from splitserve.engine.sampling_params import SamplingParams, TopLogprobs
from splitserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from splitserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer, cut_at_stop_string

logger = logging.getLogger(__name__)

@dataclass
class RequestOutput:
    """A request's state after a step. `token_ids` / `text` hold everything generated so far."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    text: str
    logprobs: list[float]
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int = 0
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per token: the params.top_logprobs most likely
    kv_block_ids: list[int] = field(default_factory=list)  # held KV of a prefill-only request
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def outputs(self) -> list["RequestOutput"]:
        """vLLM-style access (`out.outputs[0].text`): one completion per request."""
        return [self]


@dataclass(frozen=True)
class Reservation:
    """Blocks held for a prompt's KV on the decode side: the first `num_cached_blocks` come
    from this engine's prefix cache (pinned), the rest are to be written."""

    block_ids: list[int]
    num_cached_blocks: int
    block_hashes: list[int]  # of the prompt's full blocks


@dataclass
class _Tracked:
    request: Request
    detok: IncrementalDetokenizer | None
    new_tokens: list[int] = field(default_factory=list)
    text_start: int = 0  # a continuation's text begins after its output prefix's

    @classmethod
    def of(cls, request: Request, tokenizer: Tokenizer) -> "_Tracked":
        """With the detokenizer fed the request's output so far (a continuation's prefix), so
        stop strings are found across the boundary and the text continues where it was."""
        detok = IncrementalDetokenizer(tokenizer, request.params.skip_special_tokens)
        for token in request.output_token_ids:
            detok.push(token)
        return cls(request, detok, text_start=len(detok.text))


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.model, self.model_config = load_model(config.model, config.dtype, config.device)
        use_linear_kernel(self.model, config.linear_kernel, batch_hint=config.scheduler.max_num_seqs)
        self.tokenizer = Tokenizer(config.model)
        self.dtype = resolve_dtype(config.dtype, self.model_config)
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings, self.model_config.max_position_embeddings)
        num_blocks = config.num_kv_blocks or self._blocks_for_budget()
        graph_sizes = graph_batch_sizes(config.scheduler.max_num_seqs) if config.cuda_graphs else []
        self.runner = ModelRunner(self.model, self.model_config, num_blocks, config.block_size, config.attention_backend, config.seed,
                                  cuda_graph_sizes=graph_sizes, max_blocks_per_seq=-(-self.max_model_len // config.block_size))
        self.pool = BlockPool(num_blocks, config.block_size, record_events=config.record_kv_events)
        self.scheduler = Scheduler(config.scheduler, self.pool)
        self.eos_ids = set(self.model_config.eos_token_ids)
        self._requests: dict[str, _Tracked] = {}
        self._reserved: dict[str, Reservation] = {}
        # called as on_layer_done(layer, scheduled) once a step's KV for `layer` is written
        self.on_layer_done: Callable[[int, list[ScheduledRequest]], None] | None = None
        logger.info("engine ready: %d KV blocks of %d tokens", num_blocks, config.block_size)
        if num_blocks * config.block_size < self.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, fewer than the model's context of %d: a request needing more of it is refused (400 "
                "naming max_tokens or prompt); raise the KV cache memory or lower max_model_len", num_blocks * config.block_size, self.max_model_len)

    def _blocks_for_budget(self) -> int:
        per_block = ModelRunner.block_bytes(self.model_config, self.config.block_size, self.dtype)
        enough = self.config.scheduler.max_num_seqs * -(-self.max_model_len // self.config.block_size)
        return max(1, min(self.config.kv_cache_memory_bytes // per_block, enough))

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams, *, prefill_only: bool = False,
                    output_prefix: Sequence[int] = ()) -> None:
        """`output_prefix`: tokens this request already generated elsewhere (a continuation after
        a failover). They count as output — for max_tokens, stop strings and the seeded
        sampler's positions — and their KV is computed with the prompt's."""
        if request_id in self._requests or request_id in self._reserved:
            raise DuplicateRequestError(request_id)
        ids = self.encode_prompt(prompt)
        check_token_ids(params, self.model_config.vocab_size)
        prefix = self._check_prefix(output_prefix, params)
        self.check_fits(len(ids), params.max_tokens, len(ids) + len(prefix) if prefill_only else None)  # a prefill holds no output
        request = Request(request_id, ids, params, prefill_only=prefill_only, output_token_ids=prefix)
        self._requests[request_id] = _Tracked.of(request, self.tokenizer)
        self.scheduler.add(request)

    def _check_prefix(self, output_prefix: Sequence[int], params: SamplingParams) -> list[int]:
        prefix = list(output_prefix)
        if len(prefix) >= params.max_tokens:
            raise InvalidRequestError("output_prefix", f"has {len(prefix)} tokens; max_tokens ({params.max_tokens}) leaves none to generate")
        encode_prompt(self.tokenizer, self.model_config.vocab_size, prefix or [0])  # every id in the vocabulary
        return prefix

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, self.model_config.vocab_size, prompt)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int, held: int | None = None) -> None:
        """The request must fit the model's context, and what this engine holds of it (`held`
        tokens of KV; default prompt + max_tokens) its KV cache."""
        check_fits(num_prompt_tokens, max_tokens, self.max_model_len)
        capacity = self.pool.num_blocks * self.pool.block_size
        if held is not None and held > capacity:
            raise ContextLengthExceededError("prompt", f"{held} tokens to prefill exceed this engine's KV cache of {capacity} tokens")
        if held is None and num_prompt_tokens + max_tokens > capacity:
            raise ContextLengthExceededError(
                "prompt" if num_prompt_tokens >= capacity else "max_tokens",
                f"prompt + max_tokens = {num_prompt_tokens + max_tokens} tokens exceeds this engine's KV cache of {capacity} tokens",
            )

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks; also drops a reservation or a held prefill."""
        reservation = self._reserved.pop(request_id, None)
        if reservation is not None:
            self.pool.free(list(reversed(reservation.block_ids)))
            return
        if self.scheduler.release(request_id) is not None:
            return
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            raise UnknownRequestError(request_id)
        self.scheduler.finish(tracked.request, FinishReason.ABORT)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        hook = self.on_layer_done
        layer_done = None if hook is None else (lambda layer: hook(layer, out.scheduled))
        sampled, rows = self.runner.execute(out, layer_done)
        self.scheduler.on_computed(out)
        return self._update(out, sampled, rows)

    def _update(self, out: SchedulerOutput, sampled: Sampled, rows: list[int]) -> list[RequestOutput]:
        now = time.monotonic()
        results = []
        for j, i in enumerate(rows):
            tracked = self._requests[out.scheduled[i].request.request_id]
            request = tracked.request
            if request.first_token_time is None:
                request.first_token_time = now
            reason = self._append(tracked, sampled.tokens[j], sampled.logprobs[j], sampled.top_logprobs[j])
            if reason is not None:
                self.scheduler.finish(request, reason)
                del self._requests[request.request_id]
            results.append(self._output(tracked))
        return results

    def _append(self, tracked: _Tracked, token: int, logprob: float, top: TopLogprobs) -> FinishReason | None:
        """Record a sampled token; return why the request is finished, if it is."""
        request, params = tracked.request, tracked.request.params
        request.output_token_ids.append(token)
        request.output_logprobs.append(logprob)
        request.output_top_logprobs.append(top)
        tracked.new_tokens.append(token)
        if request.prefill_only:
            return FinishReason.PREFILL_DONE  # stop conditions are the decode side's to apply
        if tracked.detok is not None:
            delta = tracked.detok.push(token)
            cut = cut_at_stop_string(tracked.detok.text, len(delta), params.stop) if delta and params.stop else None
            if cut is not None:
                tracked.detok.text = cut
                return FinishReason.STOP
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return FinishReason.STOP
        if len(request.output_token_ids) >= params.max_tokens:
            return FinishReason.LENGTH
        return None

    def _output(self, tracked: _Tracked) -> RequestOutput:
        r = tracked.request
        new, tracked.new_tokens = tracked.new_tokens, []
        return RequestOutput(
            request_id=r.request_id,
            prompt_token_ids=r.prompt_token_ids,
            token_ids=list(r.output_token_ids),
            new_token_ids=new,
            text=tracked.detok.text[tracked.text_start :] if tracked.detok else "",
            logprobs=list(r.output_logprobs),
            top_logprobs=list(r.output_top_logprobs),
            finished=r.is_finished,
            finish_reason=r.finish_reason.value if r.finish_reason else None,
            num_cached_tokens=r.num_cached_tokens,
            kv_block_ids=list(r.block_ids) if r.finish_reason is FinishReason.PREFILL_DONE else [],
            metrics={"arrival": r.arrival_time, "first_token": r.first_token_time or 0.0, "preemptions": r.num_preemptions},
        )

    # ---- disaggregation: prefill side ----------------------------------------------------
    def release(self, request_id: str) -> None:
        """Free the held KV blocks of a finished prefill-only request."""
        if self.scheduler.release(request_id) is None:
            raise UnknownRequestError(request_id)

    # ---- disaggregation: decode side -----------------------------------------------------
    def reserve(self, request_id: str, prompt_token_ids: Sequence[int], max_tokens: int, output_prefix: Sequence[int] = ()) -> Reservation:
        """Allocate the blocks the KV of a prompt (and of a continuation's output prefix) will
        be written into; the caller must later `admit_prefilled` or `abort_request` it. The
        leading full blocks that this engine's prefix cache already holds are pinned and
        reused: only the blocks after `num_cached_blocks` need their KV written."""
        if request_id in self._requests or request_id in self._reserved:
            raise DuplicateRequestError(request_id)
        if not prompt_token_ids:
            raise InvalidRequestError("prompt", "is empty")
        self.check_fits(len(prompt_token_ids), max_tokens)
        ids = list(prompt_token_ids) + list(output_prefix)
        bs = self.pool.block_size
        hashes = block_hashes(ids, bs) if self.config.scheduler.enable_prefix_caching else []
        cached = self.pool.touch(hashes)
        fresh = self.pool.allocate(-(-len(ids) // bs) - len(cached))
        if fresh is None:
            self.pool.free(list(reversed(cached)))
            raise KVCapacityError(f"no room for {len(ids)} tokens of KV: {self.pool.num_free} free blocks")
        reservation = Reservation(cached + fresh, len(cached), hashes)
        self._reserved[request_id] = reservation
        return reservation

    def admit_prefilled(
        self, request_id: str, prompt_token_ids: Sequence[int], first_token: int, params: SamplingParams, first_logprob: float = 0.0,
        output_prefix: Sequence[int] = (), first_top_logprobs: TopLogprobs = (),
    ) -> RequestOutput:
        """Admit a request whose prompt KV (and its output prefix's, for a continuation) now
        fills its reserved blocks. Returns its output after the first token it samples here
        (already finished if that token ends it)."""
        reservation = self._reserved.pop(request_id, None)
        if reservation is None:
            raise UnknownRequestError(request_id)
        ids, prefix, blocks = list(prompt_token_ids), list(output_prefix), reservation.block_ids
        if len(blocks) != -(-(len(ids) + len(prefix)) // self.pool.block_size):
            self.pool.free(list(reversed(blocks)))
            raise InvalidRequestError("prompt_token_ids", f"{len(ids) + len(prefix)} tokens do not match the {len(blocks)} reserved blocks")
        request = Request(request_id, ids, params, block_ids=blocks, num_computed_tokens=len(ids) + len(prefix),
                          output_token_ids=prefix)
        # the pinned prefix is in the cache already; the blocks that arrived are cached as full
        request.block_hashes = list(reservation.block_hashes)
        request.num_cached_blocks = reservation.num_cached_blocks
        request.num_cached_tokens = reservation.num_cached_blocks * self.pool.block_size
        tracked = _Tracked.of(request, self.tokenizer)
        self._requests[request_id] = tracked
        request.first_token_time = time.monotonic()
        reason = self._append(tracked, first_token, first_logprob, list(first_top_logprobs))
        self.scheduler.add(request)
        if reason is not None:
            self.scheduler.finish(request, reason)
            del self._requests[request_id]
        return self._output(tracked)

    def score(self, prompt: Prompt) -> torch.Tensor:
        """Next-token logits [T, vocab] (float32) at every position of a prompt, in one
        forward pass on blocks borrowed for the call (perplexity, tests against a reference)."""
        ids = self.encode_prompt(prompt)
        self.check_fits(len(ids), 1)
        blocks = self.pool.allocate(-(-len(ids) // self.pool.block_size))
        if blocks is None:
            raise KVCapacityError(f"no room for {len(ids)} tokens of KV: {self.pool.num_free} free blocks")
        try:
            return self.runner.score(ids, blocks)
        finally:
            self.pool.free(blocks)

    # ---- KV access -----------------------------------------------------------------------
    @property
    def kv_layout(self) -> dict[str, object]:
        """What a peer must match to exchange KV blocks with this engine."""
        return {
            "model_fingerprint": self.model_config.fingerprint,
            "dtype": str(self.dtype).removeprefix("torch."),
            "block_size": self.pool.block_size,
            "layout": KV_LAYOUT,
            "num_layers": self.model_config.num_layers,
            "num_kv_heads": self.model_config.num_kv_heads,
            "head_dim": self.model_config.head_dim,
        }

    def read_kv(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        return self.runner.read_blocks(layer, block_ids)

    def write_kv(self, layer: int, block_ids: list[int], data: torch.Tensor) -> None:
        self.runner.write_blocks(layer, block_ids, data)

    # ---- counters ------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        reserved = sum(len(r.block_ids) for r in self._reserved.values())
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "queued_prefill_tokens": sum(r.num_tokens - r.num_computed_tokens for r in self.scheduler.waiting),
            "free_blocks": self.pool.num_free,
            "used_blocks": self.pool.num_used - reserved,
            "reserved_blocks": reserved,
            "total_blocks": self.pool.num_blocks,
            "cached_blocks": self.pool.num_cached,
        }
