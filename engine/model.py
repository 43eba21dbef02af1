"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a packed token batch.

The math knows nothing of batching or parallelism: it takes T packed tokens, their positions
and an `AttentionMetadata`, and returns logits only for the rows the caller asks for. Parameter
names follow Hugging Face, except the fused `qkv_proj` and `gate_up_proj`, which the loader
fills from the separate q/k/v and gate/up tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionBackend, AttentionMetadata
from splitserve.engine.config import ModelConfig

LayerHook = Callable[[int], None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] in float32, with linear or llama3 scaling applied."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    p = config.rope_params
    kind = p.get("rope_type")
    if kind == "linear":
        inv = inv / p["factor"]
    elif kind == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at `positions`, [T, 1, D] each: computed once per forward, used by every layer."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.sliding_window = config.sliding_windows[layer]

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin at the tokens' positions
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        q, k, v = self.project(x, rope)
        out = backend.forward(q, k, v, kv_cache, meta, self.sliding_window)  # [T, H, D]
        return self.o_proj(out.flatten(1))

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of `x` ([T, hidden]) with RoPE (cos, sin) applied:
        [T, H, D], [T, KH, D], [T, KH, D]. Shared by the paged path and context parallelism."""
        qkv = self.qkv_proj(x)  # [T, (H + 2 KH) * D]
        qk_size = self.q_size + self.kv_size
        # RoPE on the query and key heads together: one pass of elementwise ops instead of two,
        # each element computed exactly as before
        qk = apply_rope(qkv[:, :qk_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim), *rope)  # [T, H + KH, D]
        v = qkv[:, qk_size:].view(-1, self.num_kv_heads, self.head_dim)
        return qk[:, : self.num_heads], qk[:, self.num_heads :], v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        # Chunking along the sequence bounds the [T, 2 * intermediate] activation for long prompts.
        if chunk is None or x.shape[0] <= chunk:
            return self._forward(x)
        return torch.cat([self._forward(part) for part in x.split(chunk)])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2: the architectures differ only in biases and sliding windows,
    which `ModelConfig` already spells out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: torch.Tensor,  # [L, num_blocks, 2, block_size, KH, D]
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [N] rows whose next-token logits are wanted
        backend: AttentionBackend,
        on_layer_done: LayerHook | None = None,
        mlp_chunk: int | None = None,
    ) -> torch.Tensor:  # [N, vocab] float32
        m = self.model
        h = m.embed_tokens(input_ids)  # [T, hidden]
        rope = m.rotary_emb(positions, h.dtype)
        for i, layer in enumerate(m.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), rope, kv_caches[i], meta, backend)
            h = h + layer.mlp(layer.post_attention_layernorm(h), mlp_chunk)
            if on_layer_done is not None:
                on_layer_done(i)  # layer i's KV is in the cache: a transfer may start
        h = m.norm(h[logits_indices])  # logits only where a token is sampled
        return self.lm_head(h).float()
