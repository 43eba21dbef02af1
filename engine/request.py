"""A request as the scheduler sees it: token ids, progress counters and its blocks.

Life cycle:
    WAITING --scheduled (prefix lookup, blocks allocated)--> RUNNING
    RUNNING --blocks ran out--> WAITING (preempted: blocks freed, recomputed later)
    RUNNING --stop condition / abort--> FINISHED (blocks freed, or HELD for a prefill-only
        request whose KV someone still has to read out)
A request admitted with KV written by another process (decode-from-KV) starts RUNNING with
`num_computed_tokens == len(prompt)`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from splitserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"
    PREFILL_DONE = "prefill_done"  # a prefill-only request sampled its first token


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prefill_only: bool = False
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in this request's blocks
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache
    num_preemptions: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of full blocks of all tokens
    num_cached_blocks: int = 0  # leading blocks already registered in the prefix cache
    finish_reason: FinishReason | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        # a continuation's output prefix was generated (and its logprobs reported) elsewhere
        missing = len(self.output_token_ids) - len(self.output_logprobs)
        self.output_logprobs += [0.0] * missing
        self.output_top_logprobs += [[] for _ in range(len(self.output_token_ids) - len(self.output_top_logprobs))]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]
