"""Per-request sampling parameters (plain data, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.errors import InvalidRequestError

TopLogprobs = list[tuple[int, float]]  # one position's most likely tokens: (token id, logprob), most likely first
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_LOGIT_BIAS = 1024  # entries of logit_bias: each is applied on every step of the request


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops.

    temperature == 0 means greedy. top_k == 0 and top_p == 1.0 disable those filters. A seed
    makes the request's samples reproducible whatever its batch mates, chunking or placement:
    the random draw for output position i depends only on (seed, i).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # False: special tokens (EOS, BOS, pad) show in the text
    # vLLM's and OpenAI's processors (engine/sampler.py applies them, in this order)
    min_tokens: int = 0  # EOS and stop_token_ids are banned before this many output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit in [-100, 100])
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output so far
    frequency_penalty: float = 0.0  # in [-2, 2], times the token's count in the output so far
    presence_penalty: float = 0.0  # in [-2, 2], once for a token present in the output so far
    top_logprobs: int = 0  # how many of the most likely tokens to report, with their logprobs, per position

    def __post_init__(self) -> None:
        # Accept lists from callers but keep the object hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        try:
            object.__setattr__(self, "logit_bias", tuple(tuple(pair) for pair in bias))
        except TypeError:
            raise InvalidRequestError("logit_bias", f"must map token ids to biases, got {self.logit_bias!r}") from None
        self._validate()

    def _validate(self) -> None:
        _require_int("max_tokens", self.max_tokens)
        if self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"must be > 0, got {self.max_tokens}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise InvalidRequestError("temperature", f"must be a number, got {self.temperature!r}")
        if not self.temperature >= 0.0:
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature}")
        _require_int("top_k", self.top_k)
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _require_int("seed", self.seed)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop", f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _require_int("stop_token_ids", t)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(name, f"must be true or false, got {getattr(self, name)!r}")
        self._validate_processors()

    def _validate_processors(self) -> None:
        _require_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for pair in self.logit_bias:
            if len(pair) != 2:
                raise InvalidRequestError("logit_bias", f"entries are (token id, bias) pairs, got {pair!r}")
            _require_int("logit_bias", pair[0])
            if pair[0] < 0:
                raise InvalidRequestError("logit_bias", f"token ids are >= 0, got {pair[0]}")
            _require_number("logit_bias", pair[1], -100.0, 100.0)
        _require_number("repetition_penalty", self.repetition_penalty, 0.0, 1e6)
        if self.repetition_penalty <= 0:
            raise InvalidRequestError("repetition_penalty", f"must be > 0 (1 disables it), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            _require_number(name, getattr(self, name), -2.0, 2.0)
        _require_int("top_logprobs", self.top_logprobs)
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _require_number(name: str, value: object, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidRequestError(name, f"must be a number, got {value!r}")
    if not low <= value <= high:  # NaN fails this too
        raise InvalidRequestError(name, f"must be in [{low:g}, {high:g}], got {value}")


def _require_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(name, f"must be an integer, got {value!r}")

