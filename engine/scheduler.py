"""Continuous-batching scheduler with chunked prefill: plain Python, no torch.

A request passes through, in order:
    waiting (FIFO) -> running (admission order) -> finished
Each step the scheduler fills a token budget:
  1. running requests first (decode-maximal, as Sarathi-Serve): one token for each decoding
     request, the next prefill chunk for each request still reading its prompt;
  2. then waiting requests, FIFO: prefix-cache lookup, then a prefill chunk of what is left
     of the budget, so new prompts join without stalling running decodes.
When a running request needs a block and none is free, the most recently admitted running
request is preempted: its blocks are freed and it goes back to the head of the queue, to be
recomputed (prompt + tokens so far) later. Nothing fails for lack of memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from splitserve.engine.block_pool import ROOT_HASH, BlockPool, block_hashes
from splitserve.engine.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running requests at most
    max_num_batched_tokens: int = 2048  # tokens per forward pass at most
    max_prefill_chunk: int | None = None  # a prompt's tokens per step at most (None: budget)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be > 0, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be > 0, got {self.max_num_batched_tokens}")
        if self.max_prefill_chunk is not None and self.max_prefill_chunk <= 0:
            raise ValueError(f"max_prefill_chunk must be > 0, got {self.max_prefill_chunk}")


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int  # first position computed this step
    # True when this step computes the request's last known token, so its logits give the
    # next token (a mid-prompt chunk samples nothing). Fixed when scheduled.
    will_sample: bool = False

    def __post_init__(self) -> None:
        self.will_sample = self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.block_size = pool.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.held: dict[str, Request] = {}  # finished prefill-only requests keeping their KV

    # ---- queue management ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Take a request out of the queues; free its blocks unless a prefill-only request
        finished normally, in which case they are held until `release` is called."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        if request.prefill_only and reason is FinishReason.PREFILL_DONE:
            self.held[request.request_id] = request
        else:
            self._free_blocks(request)

    def release(self, request_id: str) -> Request | None:
        """Free the blocks of a held prefill-only request; returns it, or None if not held."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self._free_blocks(request)
        return request

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._chunk(request, budget)
            while not self._grow(request, request.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break
            scheduled.append(ScheduledRequest(request, n, request.num_computed_tokens))
            budget -= n
            i += 1

        # Admitting new work in a step that had to preempt would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            fresh = request.num_computed_tokens == 0
            if fresh:
                self._reuse_prefix(request)
            n = self._chunk(request, budget)
            if not self._grow(request, request.num_computed_tokens + n):
                if fresh:
                    self._undo_prefix(request)
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, n, request.num_computed_tokens))
            budget -= n

        return SchedulerOutput(scheduled, preempted)

    def on_computed(self, out: SchedulerOutput) -> None:
        """Advance progress after the forward pass and publish newly full blocks to the cache."""
        for s in out.scheduled:
            request = s.request
            request.num_computed_tokens = s.start + s.num_new_tokens
            if self.config.enable_prefix_caching:
                self._cache_full_blocks(request)

    # ---- helpers -------------------------------------------------------------------------
    def _chunk(self, request: Request, budget: int) -> int:
        n = min(request.num_tokens - request.num_computed_tokens, budget)
        if self.config.max_prefill_chunk is not None and n > 1:
            n = min(n, self.config.max_prefill_chunk)
        return n

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Make the request's blocks cover `num_tokens` tokens; False if memory is short."""
        need = -(-num_tokens // self.block_size) - len(request.block_ids)
        if need <= 0:
            return True
        blocks = self.pool.allocate(need)
        if blocks is None:
            return False
        request.block_ids.extend(blocks)
        return True

    def _reuse_prefix(self, request: Request) -> None:
        if not self.config.enable_prefix_caching:
            return
        tokens = request.all_token_ids
        request.block_hashes = block_hashes(tokens, self.block_size, request.block_hashes)
        # At least one token must be computed to produce logits, so a fully cached prompt
        # still recomputes its last block.
        limit = (len(tokens) - 1) // self.block_size
        hits = self.pool.touch(request.block_hashes[:limit])
        request.block_ids = hits
        request.num_computed_tokens = request.num_cached_tokens = len(hits) * self.block_size
        request.num_cached_blocks = len(hits)

    def _undo_prefix(self, request: Request) -> None:
        self._free_blocks(request)
        request.num_computed_tokens = request.num_cached_tokens = 0

    def _cache_full_blocks(self, request: Request) -> None:
        full = request.num_computed_tokens // self.block_size
        if full <= request.num_cached_blocks:
            return
        request.block_hashes = block_hashes(
            request.token_slice(0, full * self.block_size), self.block_size, request.block_hashes[:full]
        )
        for i in range(request.num_cached_blocks, full):
            self.pool.cache(request.block_ids[i], request.block_hashes[i], request.block_hashes[i - 1] if i else ROOT_HASH, i)
        request.num_cached_blocks = full

    def _preempt(self, request: Request) -> None:
        self._free_blocks(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _free_blocks(self, request: Request) -> None:
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
        request.num_cached_blocks = 0
