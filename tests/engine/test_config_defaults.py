"""A config.json is read as transformers reads it, checked against transformers' own config
classes: keys a config leaves out take the architecture's defaults there (a Mistral config
without `sliding_window` has a 4,096-token window, not none), and Qwen2's per-layer windows
follow `use_sliding_window`, `max_window_layers` and `layer_types`."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from splitserve.engine.config import ModelConfig

LAYERS = 30
BASE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": LAYERS, "num_attention_heads": 32, "vocab_size": 1000}
ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SLIDING = ["sliding_attention" if i % 3 == 0 else "full_attention" for i in range(LAYERS)]


def reference_windows(model_type: str, hf) -> list[int | None]:
    if model_type == "llama":
        return [None] * LAYERS
    if model_type == "mistral":
        return [hf.sliding_window] * LAYERS
    return [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]


@pytest.mark.parametrize("model_type, keys", [
    ("llama", {}),
    ("llama", {"sliding_window": 8}),  # Llama has no window, whatever the config says
    ("mistral", {}),
    ("mistral", {"sliding_window": None}),
    ("mistral", {"sliding_window": 8, "num_key_value_heads": 4, "max_position_embeddings": 512}),
    ("qwen2", {}),
    ("qwen2", {"use_sliding_window": True}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 8, "max_window_layers": 1}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1, "layer_types": SLIDING}),
])
def test_omitted_keys_take_transformers_defaults(model_type: str, keys: dict) -> None:
    raw = {"architectures": [ARCH[model_type]], "model_type": model_type, **BASE, **keys}
    hf = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})
    ours = ModelConfig.from_dict(raw)
    assert list(ours.sliding_windows) == reference_windows(model_type, hf)
    assert (ours.num_kv_heads, ours.max_position_embeddings) == (hf.num_key_value_heads, hf.max_position_embeddings)


@pytest.mark.parametrize("keys, field, words", [
    ({"hidden_act": "gelu"}, "hidden_act", "'gelu' is not supported"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config", "'gptq'"),
    ({"architectures": "LlamaForCausalLM"}, "architectures", "must be a list"),
    ({"architectures": None, "model_type": "gemma"}, "architectures", "missing"),
    ({"model_type": "gemma"}, "model_type", "does not match"),
    ({"use_sliding_window": True, "sliding_window": 8, "layer_types": ["sliding_attention"]}, "layer_types", "per layer"),
    ({"use_sliding_window": True, "sliding_window": "8"}, "sliding_window", "positive integer"),
    ({"num_key_value_heads": 7}, "num_key_value_heads", "does not divide"),
])
def test_what_the_engine_cannot_run_is_refused_naming_the_key(keys: dict, field: str, words: str) -> None:
    from splitserve.engine import CheckpointError

    raw = {"architectures": [ARCH["qwen2"]], "model_type": "qwen2", **BASE, **keys}
    with pytest.raises(CheckpointError, match=words) as e:
        ModelConfig.from_dict(raw)
    assert e.value.key == field


def test_a_config_without_architectures_is_read_by_its_model_type() -> None:
    assert ModelConfig.from_dict({"model_type": "mistral", **BASE}).architecture == "mistral"
