"""Per-request sampling parameters (plain data, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.errors import InvalidRequestError

TopLogprobs = list[tuple[int, float]]  # one position's most likely tokens: (token id, logprob), most likely first
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_LOGIT_BIAS = 1024  # entries of logit_bias: each is applied on every step of the request

# What the wire carries (proto/worker.proto, proto/public.proto): int32 counts and token ids,
# an int64 seed, float32 temperature and top_p. A value beyond them would pass here and fail
# (or wrap) when the router converts the request for a worker.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: a top_p below it would arrive as 0
# Every stop string is searched for after every new token, and every stop token id compared
# with it, on the decode worker's step shared by the whole batch: one request must not be able
# to make that step slow for its batch mates. OpenAI allows 4 stop sequences; these leave room
# for vLLM-style uses (several end-of-turn tokens and markers) and no more.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
# A temperature below this samples greedily, as vLLM's: logits divided by a smaller one can
# overflow float32 (1e-40 made every draw token 0), and what it would sample is the argmax anyway.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops.

    temperature == 0 (or below GREEDY_TEMPERATURE) means greedy. top_k == 0 and top_p == 1.0 disable those filters. A seed
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
        _require_int("max_tokens", self.max_tokens, 1, INT32_MAX)
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise InvalidRequestError("temperature", f"must be a number, got {self.temperature!r}")
        if not 0.0 <= self.temperature <= FLOAT32_MAX:  # NaN and infinity fail this too
            raise InvalidRequestError("temperature", f"must be a finite number >= 0, got {self.temperature}")
        _require_int("top_k", self.top_k, 0, INT32_MAX, " (0 disables it)")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not FLOAT32_TINY <= self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _require_int("seed", self.seed, INT64_MIN, INT64_MAX)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError("stop", f"stop strings must be non-empty strings of at most {MAX_STOP_STRING_CHARS} characters, got {_short(s)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} token ids, got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            _require_int("stop_token_ids", t, 0, INT32_MAX)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(name, f"must be true or false, got {getattr(self, name)!r}")
        self._validate_processors()

    def _validate_processors(self) -> None:
        _require_int("min_tokens", self.min_tokens, 0, self.max_tokens, " (at most max_tokens)")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for pair in self.logit_bias:
            if len(pair) != 2:
                raise InvalidRequestError("logit_bias", f"entries are (token id, bias) pairs, got {_short(pair)}")
            _require_int("logit_bias", pair[0], 0, INT32_MAX, " (token ids)")
            _require_number("logit_bias", pair[1], -100.0, 100.0)
        _require_number("repetition_penalty", self.repetition_penalty, 0.0, 1e6)
        if self.repetition_penalty <= 0:
            raise InvalidRequestError("repetition_penalty", f"must be > 0 (1 disables it), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            _require_number(name, getattr(self, name), -2.0, 2.0)
        _require_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _require_number(name: str, value: object, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidRequestError(name, f"must be a number, got {_short(value)}")
    if not low <= value <= high:  # NaN fails this too
        raise InvalidRequestError(name, f"must be in [{low:g}, {high:g}], got {value}")


def _require_int(name: str, value: object, low: int, high: int, note: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(name, f"must be an integer, got {_short(value)}")
    if not low <= value <= high:
        raise InvalidRequestError(name, f"must be in [{low}, {high}]{note}, got {_short(value)}")


def _short(value: object, limit: int = 64) -> str:
    """A value for an error message, cut short: a message must not echo a megabyte back."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        text = "an integer of thousands of digits"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
