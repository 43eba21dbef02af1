"""Which attention backend a device gets, and when decode steps are captured in CUDA graphs:
plain logic, checked on CPU. The CUDA paths themselves are not run here (no GPU), never faked."""

from __future__ import annotations

import sys

import pytest
import torch

from splitserve.engine.attention import TorchAttentionBackend
from splitserve.engine.attention_cuda import choose_backend, select_backend, unusable_reason
from splitserve.engine.cuda_graphs import capture_unavailable_reason, graph_batch_sizes, padded_size


def installed(*names: str):
    return lambda module: module in names


@pytest.mark.parametrize("present, dtype, expected", [
    (("flashinfer", "flash_attn"), torch.bfloat16, "flashinfer"),
    (("flash_attn",), torch.float16, "flash_attn"),
    ((), torch.bfloat16, "torch"),
    (("flashinfer", "flash_attn"), torch.float32, "torch"),  # the fused kernels take no float32
])
def test_auto_on_cuda_prefers_flashinfer_then_flash_attn_then_sdpa(present, dtype, expected) -> None:
    assert choose_backend("auto", "cuda", dtype, installed(*present)) == expected


def test_cpu_always_gets_sdpa_and_a_named_backend_that_cannot_run_is_an_error() -> None:
    assert choose_backend("auto", "cpu", torch.bfloat16, installed("flashinfer", "flash_attn")) == "torch"
    assert isinstance(select_backend("auto", torch.device("cpu")), TorchAttentionBackend)
    with pytest.raises(ValueError, match="flashinfer runs on CUDA only"):
        choose_backend("flashinfer", "cpu", torch.bfloat16, installed("flashinfer"))
    with pytest.raises(ValueError, match=r"not installed \(no module .flash_attn.; pip install flash-attn"):
        choose_backend("flash_attn", "cuda", torch.bfloat16, installed())
    with pytest.raises(ValueError, match="must be one of"):
        choose_backend("triton", "cuda", torch.bfloat16)
    assert unusable_reason("torch", "cpu", torch.float32) is None


def test_graph_sizes_cover_the_scheduler_and_pad_up() -> None:
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_batch_sizes(3) == [1, 2, 3] and graph_batch_sizes(0) == []
    assert graph_batch_sizes(300)[-2:] == [256, 300]
    sizes = graph_batch_sizes(32)
    assert [padded_size(n, sizes) for n in (1, 3, 17, 32, 33)] == [1, 4, 24, 32, None]


def test_capture_needs_cuda_and_a_backend_that_plans_on_the_host() -> None:
    sdpa = TorchAttentionBackend()
    assert "CUDA graphs need CUDA" in capture_unavailable_reason(True, "cpu", sdpa)
    assert "cannot be captured" in capture_unavailable_reason(True, "cuda", sdpa)
    assert capture_unavailable_reason(False, "cuda", sdpa) == "cuda_graphs is off"

    class Capturable(TorchAttentionBackend):
        supports_cuda_graphs = True

    assert capture_unavailable_reason(True, "cuda", Capturable()) is None
    with pytest.raises(NotImplementedError, match="cannot be captured"):
        sdpa.make_graph_state(4, 16)


def test_an_engine_on_cpu_runs_decode_eagerly(tiny_checkpoint) -> None:
    from splitserve.engine import LLM, SamplingParams

    llm = LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=16, max_num_seqs=4)
    assert llm.engine.runner.graphs is None
    assert len(llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))[0].token_ids) == 3


class _RecordingWrapper:
    """Stands in for a FlashInfer wrapper: records what it was planned with (nothing runs)."""

    def __init__(self, workspace, layout, **buffers) -> None:
        self.buffers, self.plans = buffers, []

    def plan(self, *args, **kwargs) -> None:
        self.plans.append((args, kwargs))


def test_flashinfer_plans_one_wrapper_per_window_and_pads_graph_steps(monkeypatch) -> None:
    """The host-side planning of the FlashInfer backend, against a recording stand-in for the
    package: layers with different sliding windows get wrappers of their own (one wrapper holds
    one plan), and a graph step's page table is the padded batch's."""
    import types

    from splitserve.engine.attention import AttentionMetadata
    from splitserve.engine.attention_cuda import FlashInferBackend

    fake = types.SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=_RecordingWrapper, BatchPrefillWithPagedKVCacheWrapper=_RecordingWrapper)
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    backend = FlashInferBackend(torch.device("cpu"))
    monkeypatch.setattr(backend, "_workspace", torch.empty(1, dtype=torch.uint8))
    meta = AttentionMetadata(query_start=[0, 1, 2], context_lens=[17, 3], block_tables=[[4, 9, 2], [7]], block_size=16,
                             slot_mapping=torch.tensor([9 * 16, 7 * 16 + 2]), decode_seqs=[0, 1], prefill_seqs=[])
    q, cache = torch.zeros(2, 4, 8), torch.zeros(10, 2, 16, 2, 8)
    full, windowed = backend._plan(meta, q, cache, None), backend._plan(meta, q, cache, 8)
    assert full is not windowed and len(full.plans) == len(windowed.plans) == 1
    indptr, indices, last = (t.tolist() for t in full.plans[0][0][:3])
    assert (indptr, indices, last) == ([0, 2, 3], [4, 9, 7], [1, 3])
    assert windowed.plans[0][1]["window_left"] == 7 and full.plans[0][1]["window_left"] == -1

    class Config:
        sliding_windows, num_heads, num_kv_heads, head_dim = (None, 8), 4, 2, 8

    state = backend.make_graph_state(4, 16)
    padded = AttentionMetadata(query_start=[0, 1, 2, 3, 4], context_lens=[17, 3, 17, 17], block_tables=[[4, 9, 2], [7], [4, 9, 2], [4, 9, 2]],
                               block_size=16, slot_mapping=torch.zeros(4, dtype=torch.long), decode_seqs=[0, 1, 2, 3], prefill_seqs=[])
    backend.plan_graph_step(padded, state, 4, Config, torch.bfloat16)
    wrappers = state["wrappers"]
    assert set(wrappers) == {(4, None), (4, 8)} and padded._cache[("flashinfer", 8)] is wrappers[(4, 8)]
    assert wrappers[(4, None)].buffers["paged_kv_last_page_len_buffer"].shape == (4,)
    args = wrappers[(4, None)].plans[0][0]
    assert args[0].tolist() == [0, 2, 3, 5, 7] and args[2].tolist() == [1, 3, 1, 1]
