"""splitserve's model executor: Llama-family models over a paged KV cache.

The names below are imported on first use, so that torch-free parts of the engine (prompt
checks, tokenizer, sampling parameters, the scheduler) can be imported by the router and the
CLI without loading torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "LLM": "llm",
    "LLMEngine": "engine",
    "RequestOutput": "engine",
    "EngineConfig": "config",
    "ModelConfig": "config",
    "SamplingParams": "sampling_params",
    "SchedulerConfig": "scheduler",
    "CheckpointError": "errors",
    "ContextLengthExceededError": "errors",
    "EngineError": "errors",
    "InvalidRequestError": "errors",
    "KVCapacityError": "errors",
    "UnknownRequestError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"splitserve.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'splitserve.engine' has no attribute {name!r}")
