"""Token sampling for a batch of rows, each with its own parameters.

Per row, in order (as vLLM does): tokens banned until `min_tokens` (EOS and the stop token ids),
`logit_bias`, the repetition penalty (over prompt and output), the frequency and presence
penalties (over the output), then temperature, top-k, top-p and the draw. Every step of it
depends only on the row's own tokens and parameters, so a request samples the same whether it
runs in one engine or is split across prefill and decode workers, or continues on another
decode worker after a failover.

The draw is the exponential-race form of the Gumbel-max trick: token = argmax(p / e) with
e ~ Exp(1) drawn per vocabulary entry. For a seeded request the noise for output position i
comes from a generator seeded with (seed, i) alone, so a request samples the same tokens
whatever its batch mates.

Logprobs (the chosen token's, and the top ones a request asks for) are the model's: log-softmax
of the raw logits, before penalties and temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from splitserve.engine.sampling_params import SamplingParams, TopLogprobs

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over the 63-bit seed space


@dataclass
class SampleRow:
    params: SamplingParams
    position: int  # index of the output token being sampled (0 = first token)
    prompt_ids: Sequence[int] = ()  # read by the repetition penalty only
    output_ids: Sequence[int] = ()  # the output so far, a continuation's prefix included
    banned_ids: Sequence[int] = ()  # suppressed while position < params.min_tokens (EOS, stop ids)

    @classmethod
    def of(cls, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int], eos_ids: Sequence[int]) -> "SampleRow":
        """The row for sampling output position len(output_ids) of a request."""
        banned: tuple[int, ...] = ()
        if params.min_tokens > len(output_ids):
            banned = (*params.stop_token_ids, *(() if params.ignore_eos else eos_ids))
        return cls(params, len(output_ids), prompt_ids, output_ids, banned)


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[float]  # of each chosen token
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per row, params.top_logprobs of them


def sample(logits: torch.Tensor, rows: Sequence[SampleRow], generator: torch.Generator | None = None) -> Sampled:
    """logits [N, V] float32 -> the chosen tokens with their logprobs (and top logprobs)."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [N, V]
    logits = _process(logits, rows)
    tokens = torch.argmax(logits, dim=-1)  # greedy for every row; random rows overwrite below
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        tokens[idx] = _sample_random(logits[idx], [rows[i] for i in random_rows], generator)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return Sampled(tokens.tolist(), chosen.tolist(), _top(logprobs, rows))


def _top(logprobs: torch.Tensor, rows: Sequence[SampleRow]) -> list[TopLogprobs]:
    k = max((r.params.top_logprobs for r in rows), default=0)
    if k == 0:
        return [[] for _ in rows]
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    values, ids = values.tolist(), ids.tolist()
    return [list(zip(ids[i], values[i]))[: r.params.top_logprobs] for i, r in enumerate(rows)]


def _process(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Bans, biases and penalties, for the rows that ask for them (a copy when any does)."""
    if not any(_processed(r.params) for r in rows):
        return logits
    logits = logits.clone()
    vocab, dev = logits.shape[-1], logits.device

    def ids_of(ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(ids), dtype=torch.long, device=dev)

    for i, r in enumerate(rows):
        p = r.params
        if p.min_tokens and r.position < p.min_tokens and r.banned_ids:
            logits[i, ids_of(r.banned_ids)] = float("-inf")
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias)
            logits[i, ids_of(ids)] += torch.tensor(bias, dtype=logits.dtype, device=dev)
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=dev)
            seen[ids_of([*r.prompt_ids, *r.output_ids])] = True
            row = logits[i]
            penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            logits[i] = torch.where(seen, penalized, row)
        if (p.frequency_penalty or p.presence_penalty) and r.output_ids:
            counts = torch.bincount(ids_of(r.output_ids), minlength=vocab)[:vocab].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _processed(p: SamplingParams) -> bool:
    return bool(p.min_tokens or p.logit_bias or p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty)


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
