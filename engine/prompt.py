"""Prompt checks shared by the engine and the router (torch-free, so the router can run them
before any worker sees the request)."""

from __future__ import annotations

from collections.abc import Sequence

from splitserve.engine.errors import ContextLengthExceededError, InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.tokenizer import Tokenizer

Prompt = str | Sequence[int]


def encode_prompt(tokenizer: Tokenizer, vocab_size: int, prompt: Prompt) -> list[int]:
    """Token ids of a prompt (text or ids), checked: non-empty, every id in the vocabulary."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt) if prompt else []
    else:
        ids = list(prompt)
        bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("prompt", f"token id {bad!r} is not in the vocabulary [0, {vocab_size})")
    if not ids:
        raise InvalidRequestError("prompt", "is empty")
    return ids


def check_fits(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """The prompt, and the prompt plus `max_tokens`, must fit the model's context."""
    # worded as OpenAI's and vLLM's ("maximum context length"), which clients look for to fall back
    if num_prompt_tokens >= max_model_len:
        raise ContextLengthExceededError("prompt", f"has {num_prompt_tokens} tokens; this model's maximum context length is {max_model_len} tokens")
    if num_prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthExceededError(
            "max_tokens", f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds this model's maximum context length of "
            f"{max_model_len} tokens"
        )


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """The token ids a request's parameters name (stop ids, logit bias) are in the vocabulary."""
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [t for t, _ in params.logit_bias])):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(name, f"token id {bad} is not in the vocabulary [0, {vocab_size})")
