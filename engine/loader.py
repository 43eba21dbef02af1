"""Build a model from a Hugging Face checkpoint folder.

Reads `config.json`, then every tensor from `model.safetensors` or the shards listed in
`model.safetensors.index.json`, straight into preallocated parameters (fusing q/k/v and
gate/up on the way). Every parameter must be filled exactly once with the right shape; a
missing, mis-shaped or unknown tensor is a `CheckpointError` naming it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from splitserve.engine.checkpoint import checkpoint_fingerprint, safetensors_files
from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.model import LlamaForCausalLM, rope_inv_freq

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Hugging Face tensor suffix -> (our fused parameter suffix, shard index)
FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # quantized or integer tensors do not load


def resolve_dtype(dtype: str, config: ModelConfig) -> torch.dtype:
    name = config.torch_dtype if dtype == "auto" else dtype
    if name not in TORCH_DTYPES:
        raise CheckpointError("torch_dtype", f"{name!r} is not supported; use one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def load_model(model_dir: str | Path, dtype: str = "auto", device: str = "cpu") -> tuple[LlamaForCausalLM, ModelConfig]:
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=torch_dtype).to_empty(device=device)
    # Buffers and ties do not survive `to_empty`: restore them.
    model.model.rotary_emb.inv_freq = rope_inv_freq(config).to(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    files = safetensors_files(model_dir)
    _fill(model, config, files)
    config = dataclasses.replace(config, fingerprint=checkpoint_fingerprint(config, files))
    model.config = config
    model.eval()
    logger.info("loaded %s (%s, %d layers) from %s as %s", config.architecture, config.fingerprint, config.num_layers, model_dir, torch_dtype)
    return model, config


def _fill(model: LlamaForCausalLM, config: ModelConfig, files: list[Path]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    # Every (parameter, shard) that must be loaded, with the HF name a user would recognise.
    pending = _expected(params, config)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                target = _target(name, config)
                if target is None:
                    continue
                if target not in pending:
                    raise CheckpointError(name, f"unexpected tensor in {path.name} (not part of a {config.architecture} model of this config)")
                hf_name, dest = pending.pop(target)
                tensor = f.get_tensor(name)
                if tensor.dtype not in WEIGHT_DTYPES:
                    raise CheckpointError(name, f"is stored as {str(tensor.dtype).removeprefix('torch.')}; only float32, bfloat16 and float16 weights load")
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise CheckpointError(name, f"has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
                dest.copy_(tensor)
    if pending:
        missing = sorted(hf for hf, _ in pending.values())
        raise CheckpointError(missing[0], f"missing from the checkpoint ({len(missing)} tensors missing: {', '.join(missing[:5])}...)")


def _target(hf_name: str, config: ModelConfig) -> tuple[str, int] | None:
    """(our parameter name, shard) for a checkpoint tensor, or None if it is to be skipped."""
    if hf_name.endswith(IGNORED_SUFFIXES):
        return None
    if hf_name == "lm_head.weight" and config.tie_word_embeddings:
        return None
    for hf, (ours, shard) in FUSED.items():
        if f".{hf}." in hf_name:
            return hf_name.replace(f".{hf}.", f".{ours}."), shard
    return hf_name, 0


def _expected(params: dict[str, torch.nn.Parameter], config: ModelConfig) -> dict[tuple[str, int], tuple[str, torch.Tensor]]:
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    inter = config.intermediate_size
    splits = {"self_attn.qkv_proj": ([q, kv, kv], ["q_proj", "k_proj", "v_proj"]), "mlp.gate_up_proj": ([inter, inter], ["gate_proj", "up_proj"])}
    out: dict[tuple[str, int], tuple[str, torch.Tensor]] = {}
    for name, p in params.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        fused = next((k for k in splits if f".{k}." in name), None)
        if fused is None:
            out[(name, 0)] = (name, p.data)
            continue
        sizes, hf_parts = splits[fused]
        for shard, (part, hf) in enumerate(zip(p.data.split(sizes, dim=0), hf_parts)):
            out[(name, shard)] = (name.replace(fused, fused.split(".")[0] + "." + hf), part)
    return out
