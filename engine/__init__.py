"""splitserve's model executor: Llama-family models over a paged KV cache."""

from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine, RequestOutput
from engine.errors import (
    CheckpointError,
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    KVCapacityError,
    UnknownRequestError,
)
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerConfig

__all__ = [
    "LLM",
    "CheckpointError",
    "ContextLengthExceededError",
    "EngineConfig",
    "EngineError",
    "InvalidRequestError",
    "KVCapacityError",
    "LLMEngine",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
    "UnknownRequestError",
]
