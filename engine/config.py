"""Engine configuration: the model's shape (read from a Hugging Face `config.json`) and the
engine's own knobs. Both are frozen dataclasses validated once, when built."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.engine.errors import CheckpointError
from splitserve.engine.scheduler import SchedulerConfig

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "swish")  # the same function under two names
# What transformers' config classes assume for keys a config.json leaves out, where the
# architectures differ (a missing sliding_window is 4096 for Mistral, not "none").
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "num_key_value_heads": None, "sliding_window": None},
    "mistral": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": 4096, "max_window_layers": 28},
}
LAYER_TYPES = ("full_attention", "sliding_attention")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LINEAR_KERNELS = ("torch", "onednn")  # cpu_linear.py says what each is
ATTENTION_BACKENDS = ("auto", "torch", "flash_attn", "flashinfer")  # attention_cuda.py says which "auto" picks


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # sorted items of the scaling dict
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    fingerprint: str  # config.json alone here; the loader widens it to the weights (checkpoint_fingerprint)

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError("config.json", f"not found in {model_dir}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError("config.json", f"is not valid JSON: {e}") from e
        gen = Path(model_dir) / "generation_config.json"
        gen_raw = json.loads(gen.read_text()) if gen.is_file() else {}
        return cls.from_dict(raw, gen_raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> "ModelConfig":
        arch = _architecture(raw)
        defaults = ARCH_DEFAULTS[arch]

        def get(key: str) -> Any:  # the key's value, or transformers' default for this architecture
            return raw[key] if key in raw else defaults.get(key)

        def need(key: str) -> Any:
            if key not in raw:
                raise CheckpointError(key, "missing from config.json")
            return raw[key]

        act = raw.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise CheckpointError("hidden_act", f"{act!r} is not supported; supported: {list(SUPPORTED_ACTIVATIONS)}")
        quant = raw.get("quantization_config")
        if quant:
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise CheckpointError("quantization_config", f"quantized checkpoints ({method!r}) are not supported; use float32, bfloat16 or float16 weights")
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        layers = int(need("num_hidden_layers"))
        kv_heads = int(get("num_key_value_heads") or heads)
        if heads % kv_heads:
            omitted = "" if "num_key_value_heads" in raw else f" (transformers' default for {arch}: config.json omits it)"
            raise CheckpointError("num_key_value_heads", f"{kv_heads}{omitted} does not divide num_attention_heads={heads}")
        head_dim = int(raw.get("head_dim") or hidden // heads)
        theta, scaling = _rope(raw)
        gen = generation or {}
        eos = gen.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(get("max_position_embeddings")),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True if arch == "qwen2" else bool(raw.get("attention_bias", False)),
            o_bias=False if arch == "qwen2" else bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)) if arch == "llama" else False,
            sliding_windows=_sliding_windows(arch, raw, layers, get),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            bos_token_id=gen.get("bos_token_id", raw.get("bos_token_id")),
            eos_token_ids=eos_ids,
            fingerprint=hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16],
        )


def _rope(raw: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """Read RoPE settings in either the legacy (`rope_theta` + `rope_scaling`) or the newer
    (`rope_parameters`) Hugging Face form."""
    params = raw.get("rope_parameters")
    key = "rope_parameters" if params else "rope_scaling"
    scaling = dict(params or raw.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"{key}.rope_type", f"{rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return theta, None
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    for k in required[rope_type]:
        if k not in scaling:
            raise CheckpointError(f"{key}.{k}", f"required for rope_type {rope_type!r}")
    return theta, tuple(sorted(scaling.items()))


def _architecture(raw: dict[str, Any]) -> str:
    """The model's architecture from `architectures` (what serving engines read), or from
    `model_type` (what transformers reads) when that is missing; the two must agree."""
    archs, model_type = raw.get("architectures"), raw.get("model_type")
    supported = set(SUPPORTED_ARCHITECTURES.values())
    if archs is None:
        if model_type not in supported:
            raise CheckpointError("architectures", f"missing from config.json, and model_type {model_type!r} is not one of {sorted(supported)}")
        return model_type
    if not isinstance(archs, list):
        raise CheckpointError("architectures", f"must be a list of class names, got {archs!r}")
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError("architectures", f"{archs!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    if model_type is not None and model_type != arch:
        raise CheckpointError("model_type", f"{model_type!r} does not match architectures {archs!r} (model_type {arch!r})")
    return arch


def _sliding_windows(arch: str, raw: dict[str, Any], layers: int, get) -> tuple[int | None, ...]:
    """Each layer's attention window, None = full, as transformers builds the model: Llama has
    none; Mistral uses `sliding_window` everywhere; Qwen2 only with `use_sliding_window`, on
    the layers `layer_types` names (by default those from `max_window_layers` on)."""
    if arch == "llama":
        return (None,) * layers
    window = get("sliding_window")
    if arch == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise CheckpointError("sliding_window", f"must be a positive integer or null, got {window!r}")
    if arch == "mistral":
        return (window,) * layers
    types = raw.get("layer_types")
    if types is None:
        first = int(get("max_window_layers"))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise CheckpointError("layer_types", f"must list one of {list(LAYER_TYPES)} per layer ({layers}), got {types!r}")
    return tuple(window if t == "sliding_attention" else None for t in types)


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs to start. `num_kv_blocks` None sizes the pool from
    `kv_cache_memory_bytes`."""

    model: str
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 1 << 30
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"  # ATTENTION_BACKENDS; "auto": the fastest usable on the device
    linear_kernel: str = "torch"  # LINEAR_KERNELS: "onednn" trades bitwise parity with transformers for speed on CPU
    num_threads: int | None = None  # torch.set_num_threads for this process; None leaves PyTorch's choice
    cuda_graphs: bool = True  # capture decode steps where the device and attention backend can (engine/cuda_graphs.py)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    record_kv_events: bool = False  # workers publish prefix-cache events (BlockPool.drain_events)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be > 0, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {LINEAR_KERNELS}, got {self.linear_kernel!r}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads must be > 0, got {self.num_threads}")
