"""Which attention backend a device gets, and when decode steps are captured in CUDA graphs:
plain logic, checked on CPU. The CUDA paths themselves are not run here (no GPU), never faked."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match="not installed"):
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
