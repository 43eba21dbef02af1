"""Bad input fails with a specific error that names the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.engine import (
    LLM,
    CheckpointError,
    ContextLengthExceededError,
    InvalidRequestError,
    SamplingParams,
)


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), dtype="float32", max_model_len=256)


def test_a_kv_cache_smaller_than_the_context_is_said_at_start(llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Requests past the cache are refused later; the operator hears why when the engine starts."""
    with caplog.at_level("WARNING", logger="splitserve.engine.engine"):
        small = LLM(str(llama_dir), dtype="float32", max_model_len=256, num_kv_blocks=4)
    assert "holds 64 tokens, fewer than the model's context of 256" in caplog.text
    with pytest.raises(ContextLengthExceededError) as e:
        small.generate([[5] * 60], SamplingParams(max_tokens=10))
    assert e.value.field == "max_tokens" and "KV cache of 64 tokens" in str(e.value)
    caplog.clear()
    with caplog.at_level("WARNING", logger="splitserve.engine.engine"):
        LLM(str(llama_dir), dtype="float32", max_model_len=256, num_kv_blocks=16)
    assert "fewer than the model's context" not in caplog.text


def test_empty_prompt(llm: LLM) -> None:
    for empty in ("", []):
        with pytest.raises(InvalidRequestError) as e:
            llm.generate([empty], SamplingParams())
        assert e.value.field == "prompt" and "empty" in str(e.value)


def test_prompt_beyond_context(llm: LLM) -> None:
    with pytest.raises(ContextLengthExceededError) as e:
        llm.generate([[5] * 300], SamplingParams(max_tokens=1))
    assert e.value.field == "prompt" and "256" in str(e.value)
    with pytest.raises(ContextLengthExceededError) as e:
        llm.generate([[5] * 200], SamplingParams(max_tokens=100))
    assert e.value.field == "max_tokens"
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks  # nothing half-admitted


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_sampling_params(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and field in str(e.value)


def test_token_id_outside_vocabulary(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="vocabulary") as e:
        llm.generate([[1, 2, 10**6]], SamplingParams())
    assert e.value.field == "prompt"


def test_failed_batch_leaves_no_request_behind(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError):
        llm.generate([[1, 2, 3], []], SamplingParams())
    assert not llm.engine.has_unfinished_requests()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_weight_tensor_is_named(llama_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(llama_dir, tmp_path / "ckpt")
    weights = load_file(ckpt / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        LLM(str(ckpt))
    assert e.value.key == "model.layers.1.self_attn.k_proj.weight"


def test_a_quantized_tensor_is_named_not_converted(llama_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(llama_dir, tmp_path / "int8")
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"] = weights["model.layers.0.mlp.down_proj.weight"].to(torch.int8)
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="stored as int8") as e:
        LLM(str(ckpt))
    assert e.value.key == "model.layers.0.mlp.down_proj.weight"


def test_misshaped_and_unknown_tensors_are_named(llama_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(llama_dir, tmp_path / "shape")
    weights = load_file(ckpt / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(3)
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"shape \(3,\)") as e:
        LLM(str(ckpt))
    assert e.value.key == "model.norm.weight"

    ckpt = _copy(llama_dir, tmp_path / "extra")
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.0.mystery.weight"] = torch.ones(2)
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        LLM(str(ckpt))
    assert e.value.key == "model.layers.0.mystery.weight"


def test_unknown_architecture_and_config_keys(llama_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(llama_dir, tmp_path / "arch")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel") as e:
        LLM(str(ckpt))
    assert e.value.key == "architectures"

    (ckpt / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(CheckpointError, match="yarn") as e:
        LLM(str(ckpt))
    assert e.value.key == "rope_scaling.rope_type"

    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        LLM(str(ckpt))
    assert e.value.key == "hidden_size"


def test_missing_files_are_named(tmp_path: Path, llama_dir: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        LLM(str(tmp_path))
    assert e.value.key == "config.json"
    ckpt = _copy(llama_dir, tmp_path / "notok")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as e:
        LLM(str(ckpt))
    assert e.value.key == "tokenizer.json"
