"""The scheduler alone: plain Python requests, no model."""

from __future__ import annotations

import subprocess
import sys

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.request import FinishReason, Request, RequestStatus
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


def make(num_blocks: int = 64, block_size: int = 4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockPool(num_blocks, block_size))


def req(rid: str, n: int, start: int = 0) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=100))


def run_step(s: Scheduler, sample_token: int = 7) -> SchedulerOutput:
    """What the engine does around the model: advance, then append a token where sampled."""
    out = s.schedule()
    s.on_computed(out)
    for x in out.scheduled:
        if x.will_sample:
            x.request.output_token_ids.append(sample_token)
    return out


def test_scheduler_does_not_import_torch() -> None:
    code = "import sys, splitserve.engine.scheduler, splitserve.engine.block_pool, splitserve.engine.request; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_chunked_prefill_respects_budget_and_chunk_cap() -> None:
    s = make(max_num_batched_tokens=10, max_prefill_chunk=6)
    a, b = req("a", 15), req("b", 3)
    s.add(a)
    s.add(b)
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 6), ("b", 3)]
    assert not out.scheduled[0].will_sample and out.scheduled[1].will_sample
    out = run_step(s)  # b decodes first (running, one token), a gets its next chunk
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 6), ("b", 1)]
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 3), ("b", 1)]
    assert out.scheduled[0].will_sample and a.num_computed_tokens == 15


def test_decodes_are_never_starved_by_a_long_prompt() -> None:
    s = make(max_num_batched_tokens=8)
    d = req("d", 2)
    s.add(d)
    run_step(s)
    s.add(req("long", 100))
    for _ in range(5):
        out = run_step(s)
        assert out.scheduled[0].request is d and out.scheduled[0].num_new_tokens == 1
        assert out.num_batched_tokens <= 8


def test_max_num_seqs_limits_running() -> None:
    s = make(max_num_seqs=2)
    for i in range(3):
        s.add(req(str(i), 2))
    out = run_step(s)
    assert len(out.scheduled) == 2 and len(s.waiting) == 1


def test_preemption_frees_blocks_and_requeues_at_head() -> None:
    # 4 blocks of 4 tokens: two prompts of 8 tokens fill them; the next token needs a fifth.
    s = make(num_blocks=4, block_size=4)
    a, b = req("a", 8), req("b", 8, start=100)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled (2 blocks each) and sampled one token
    assert s.pool.num_free == 0
    out = run_step(s)  # computing a's 9th token needs a third block: b is preempted
    assert out.preempted == [b]
    assert b.status is RequestStatus.WAITING and s.waiting[0] is b
    assert b.num_computed_tokens == 0 and b.block_ids == [] and b.num_preemptions == 1
    assert [x.request for x in out.scheduled] == [a]
    # b comes back later and recomputes prompt + its output token
    s.finish(a, FinishReason.LENGTH)
    out = run_step(s)
    x = out.scheduled[0]
    assert x.request is b and x.start + x.num_new_tokens == 9
    # its first block survived in the prefix cache (the second was evicted for a)
    assert b.num_cached_tokens == 4 and x.start == 4


def test_prefix_cache_hit_skips_cached_blocks_but_recomputes_last() -> None:
    s = make(block_size=4)
    a = req("a", 12)
    s.add(a)
    run_step(s)
    s.finish(a, FinishReason.STOP)
    assert s.pool.num_free == s.pool.num_blocks
    b = Request("b", list(range(12)) + [99, 98], SamplingParams())
    s.add(b)
    out = run_step(s)
    assert b.num_cached_tokens == 12 and out.scheduled[0].start == 12 and out.scheduled[0].num_new_tokens == 2
    # an identical prompt: everything cached, the last block is still recomputed for logits
    c = Request("c", list(range(12)), SamplingParams())
    s.add(c)
    out = run_step(s)
    x = next(x for x in out.scheduled if x.request is c)
    assert c.num_cached_tokens == 8 and x.start == 8 and x.num_new_tokens == 4


def test_finish_prefill_only_holds_blocks_until_release() -> None:
    s = make()
    r = Request("p", list(range(9)), SamplingParams(), prefill_only=True)
    s.add(r)
    run_step(s)
    blocks = list(r.block_ids)
    s.finish(r, FinishReason.PREFILL_DONE)
    assert s.pool.num_used == len(blocks) == 3
    assert s.release("p") is r
    assert s.pool.num_used == 0 and s.release("p") is None


def test_abort_of_a_prefill_only_request_frees_at_once() -> None:
    s = make()
    r = Request("p", list(range(9)), SamplingParams(), prefill_only=True)
    s.add(r)
    run_step(s)
    s.finish(r, FinishReason.ABORT)
    assert s.pool.num_used == 0 and not s.held
