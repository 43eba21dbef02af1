"""Which GEMM library the model's linear layers use on CPU.

"torch" (the default) is `nn.Linear` as it is: PyTorch's CPU matmul, MKL in the official
builds, the same kernels Hugging Face transformers runs, so float32 logits match it bit for
bit. "onednn" packs every linear layer's weight once, at load, into oneDNN's blocked layout
and multiplies through oneDNN (what vLLM's CPU build does). On CPUs where MKL takes its
generic AVX2 path (AMD's) that is about twice as fast, for prefill and decode alike; but the
sums are accumulated in another order, so float32 results differ from Hugging Face in the
last bits (greedy tokens stay the same unless two logits nearly tie). Packing keeps the
original weights too (parameter names stay, and a tied embedding reads the lm_head's weight):
linear weights take twice their memory. Engines and context-parallel prefill ranks (`CPRank`)
are switched alike, from the same setting.
"""

from __future__ import annotations

import torch
from torch import nn

from splitserve.engine.config import LINEAR_KERNELS


def onednn_unusable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"oneDNN packing is for CPU (device is {device.type})"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN packing takes float32 or bfloat16 (dtype is {str(dtype).removeprefix('torch.')})"
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn)"
    return None


class PackedLinear(nn.Module):
    """`nn.Linear` whose product runs through oneDNN on a weight packed once. Keeps the
    parameter names (`weight`, `bias`) of the layer it replaces."""

    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # The hint only tunes the packed layout for that many rows; any row count works.
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.register_buffer("packed_weight", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        bias = None if self.bias is None else self.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def use_linear_kernel(model: nn.Module, kernel: str, batch_hint: int = 32) -> int:
    """Switch every `nn.Linear` of `model` to `kernel`; returns how many layers changed."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"linear_kernel must be one of {list(LINEAR_KERNELS)}, got {kernel!r}")
    if kernel == "torch":
        return 0
    p = next(model.parameters())
    reason = onednn_unusable_reason(p.device, p.dtype)
    if reason is not None:
        raise ValueError(f"linear_kernel 'onednn' cannot run here: {reason}")
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children() if type(child) is nn.Linear]
    with torch.inference_mode():
        for parent, name, child in swaps:
            setattr(parent, name, PackedLinear(child, batch_hint))
    return len(swaps)
