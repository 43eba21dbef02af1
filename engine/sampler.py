"""Token sampling for a batch of rows, each with its own parameters.

Sampling uses the exponential-race form of the Gumbel-max trick: token = argmax(p / e) with
e ~ Exp(1) drawn per vocabulary entry. For a seeded request the noise for output position i
comes from a generator seeded with (seed, i) alone, so a request samples the same tokens
whatever its batch mates, and also when its decode continues on another worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitserve.engine.sampling_params import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over the 63-bit seed space


@dataclass
class SampleRow:
    params: SamplingParams
    position: int  # index of the output token being sampled (0 = first token)


def sample(logits: torch.Tensor, rows: Sequence[SampleRow], generator: torch.Generator | None = None) -> tuple[list[int], list[float]]:
    """logits [N, V] float32 -> (token ids, logprob of each under the model's distribution)."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [N, V]
    tokens = torch.argmax(logits, dim=-1)  # greedy for every row; random rows overwrite below
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        picked = _sample_random(logits[idx], [rows[i] for i in random_rows], generator)
        tokens[idx] = picked
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), chosen.tolist()


def _sample_random(logits: torch.Tensor, rows: Sequence[SampleRow], generator: torch.Generator | None) -> torch.Tensor:
    n, vocab = logits.shape
    temps = torch.tensor([r.params.temperature for r in rows], device=logits.device)[:, None]
    logits = logits / temps
    top_k = [r.params.top_k for r in rows]
    if any(0 < k < vocab for k in top_k):
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device)[:, None]
    if bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs)
    for i, r in enumerate(rows):
        g = generator
        if r.params.seed is not None:
            g = torch.Generator(device=logits.device)
            g.manual_seed(((r.params.seed * _MIX) ^ (r.position + 1) * 0xBF58476D1CE4E5B9) & (2**63 - 1))
        noise[i].exponential_(generator=g)
    return torch.argmax(probs / noise, dim=-1)
