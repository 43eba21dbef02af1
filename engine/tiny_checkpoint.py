"""Write a small random-weight Hugging Face checkpoint folder, fully offline.

The folder is what a real checkpoint looks like to every loader (ours and Hugging Face's):
config.json, model.safetensors (or shards + index), generation_config.json, tokenizer.json
(a byte-level BPE trained here on the text below, so any string encodes),
tokenizer_config.json (with a chat template) and special_tokens_map.json. The same arguments
and seed always give the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and tokenizers load on use: the CLI imports TinySpec without them
    import torch
    from tokenizers import Tokenizer

ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}
BOS, EOS = "<s>", "</s>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = """\
Prefill reads the whole prompt at once and is limited by arithmetic; decode produces one token
at a time and is limited by how fast the key and value cache can be read from memory. Serving
both phases on the same device makes them interfere: a long prompt stalls every running
decode, and a full decode batch delays the first token of new requests. Disaggregated serving
runs the two phases on separate pools of workers. The prefill worker computes the cache of the
prompt layer by layer and streams it to a decode worker, which continues generation exactly
where a single engine would have. A router pairs each request with a prefill worker and a
decode worker, watching queue lengths, free cache blocks and cached prefixes.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14159 2.71828 42.
Les modèles de langue génèrent du texte; die Schlüssel und Werte; 日本語のテキスト; emoji 🙂.
def step(self): batch = self.scheduler.schedule(); out = self.runner.execute(batch); return out
{"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}
"""


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: str | None = None  # "llama3" or None
    tie_word_embeddings: bool | None = None  # None: the architecture's usual choice
    sliding_window: int | None = None
    dtype: str = "float32"
    seed: int = 0
    shard_size: int | None = None  # bytes per safetensors shard; None: one file

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("head_dim", "sliding_window"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sliding_window is not None and self.arch != "mistral":
            raise ValueError(f"sliding_window is for arch mistral only (the others' configs have none), got arch {self.arch!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.rope_scaling not in (None, "llama3"):
            raise ValueError(f"rope_scaling must be 'llama3' or None, got {self.rope_scaling!r}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {self.vocab_size}")


def write_tiny_checkpoint(out_dir: str | Path, spec: TinySpec = TinySpec(), overwrite: bool = True) -> Path:
    """Write the checkpoint into `out_dir`. With `overwrite` False a folder that holds anything
    else is refused (FileExistsError), so that a real checkpoint is never replaced by mistake;
    one that holds this very checkpoint (same spec and seed) is left as it is."""
    out = Path(out_dir)
    if not overwrite and out.exists() and any(out.iterdir()):
        if _same_checkpoint(out, spec):
            return out
        raise FileExistsError(f"{out} is not empty: choose a new folder, or pass --force to overwrite what is there")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(spec.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    config = _config(spec, bos, eos)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": BOS,
                "eos_token": EOS,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": spec.max_position_embeddings,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}, indent=2) + "\n")
    _save_weights(out, _weights(spec, config), spec.shard_size)
    (out / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec), indent=2) + "\n")  # last: a folder with it is whole
    return out


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


SPEC_FILE = "splitserve_tiny.json"  # the spec a folder was written from: a rerun can tell it is the same


def _same_checkpoint(out: Path, spec: TinySpec) -> bool:
    try:
        return json.loads((out / SPEC_FILE).read_text()) == dataclasses.asdict(spec)
    except (OSError, ValueError):
        return False


def _config(spec: TinySpec, bos: int, eos: int) -> dict:
    arch, model_type = ARCHS[spec.arch]
    tie = spec.tie_word_embeddings if spec.tie_word_embeddings is not None else spec.arch == "qwen2"
    config = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim or spec.hidden_size // spec.num_heads,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": tie,
        "torch_dtype": spec.dtype,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
    }
    if spec.arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    if spec.arch == "mistral":
        config["sliding_window"] = spec.sliding_window
    if spec.arch == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.num_layers)
    if spec.rope_scaling == "llama3":
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": max(16, spec.max_position_embeddings // 8),
        }
    return config


def _weights(spec: TinySpec, config: dict) -> dict[str, torch.Tensor]:
    import torch

    g = torch.Generator().manual_seed(spec.seed)
    d, inter, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    hd = config["head_dim"]
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        # 1/sqrt(fan_in) keeps activations O(1), so logits are spread and greedy ties rare
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(d, generator=g)

    # Tied embeddings double as the output layer: at unit scale a token's own embedding would
    # dominate the residual stream and greedy decoding would repeat the prompt's last token.
    embed_scale = 1 / math.sqrt(d) if config["tie_word_embeddings"] else 1.0
    w = {"model.embed_tokens.weight": torch.randn(v, d, generator=g) * embed_scale}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            w[p + f"self_attn.{name}.weight"] = linear(rows, d)
            if spec.arch == "qwen2":
                w[p + f"self_attn.{name}.bias"] = 0.1 * torch.randn(rows, generator=g)
        w[p + "self_attn.o_proj.weight"] = linear(d, q)
        w[p + "mlp.gate_proj.weight"] = linear(inter, d)
        w[p + "mlp.up_proj.weight"] = linear(inter, d)
        w[p + "mlp.down_proj.weight"] = linear(d, inter)
    w["model.norm.weight"] = norm()
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = linear(v, d)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]
    return {k: t.to(dtype).contiguous() for k, t in w.items()}


def _save_weights(out: Path, weights: dict[str, torch.Tensor], shard_size: int | None) -> None:
    from safetensors.torch import save_file

    for old in out.glob("model*.safetensors*"):
        old.unlink()
    if not shard_size:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in weights.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
