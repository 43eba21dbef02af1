"""The OpenAI protocol's request and response bodies, as pydantic models.

Requests are strict: a wrong type is refused (no "10" for 10, no true for 1), numbers are finite
(Python's JSON parser accepts NaN and Infinity; JSON does not), strings are Unicode text (a lone
surrogate escape such as "\\ud800" would reach the tokenizer and the wire, which refuse it), and
a field this server does not know is refused by name rather than ignored. The validation errors
become 400s naming the field (router/http_api.py). Extensions beyond OpenAI's fields follow
vLLM's names (`top_k`, `min_tokens`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`,
`skip_special_tokens`); `slo_ttft_ms` / `slo_tpot_ms` are this server's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AllowInfNan, BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.sampling_params import SamplingParams

Number = Annotated[float, Strict(), AllowInfNan(False)]  # a finite int or float, never a bool or a string


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError("unicode", "must be Unicode text: {reason} at character {start}",
                                  {"reason": e.reason, "start": e.start}) from None
    return text


Text = Annotated[StrictStr, AfterValidator(_unicode)]


def _one_of(description: str) -> WrapValidator:
    """One clear error for a union ("must be X or Y") instead of one per alternative, unless
    the value has the right shape and only its text is bad."""

    def wrap(value: Any, handler):
        try:
            return handler(value)
        except ValidationError as e:
            bad_text = next((err for err in e.errors() if err["type"] == "unicode"), None)
            if bad_text is not None:
                raise PydanticCustomError("unicode", bad_text["msg"]) from None
            raise PydanticCustomError("one_of", f"must be {description}") from None

    return WrapValidator(wrap)


TokenIds = list[StrictInt]
Prompt = Annotated[Text | TokenIds | list[Text] | list[TokenIds], _one_of("a string, a list of token ids, or a list of either")]
Stop = Annotated[Text | list[Text] | None, _one_of("a string or a list of strings")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False


MAX_CHOICES = 64  # prompts x n of one request: each choice is a request of its own in the cluster


class _Sampling(_Body):
    """Fields both endpoints share."""

    model: Text | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt = 1
    stop: Stop = None
    seed: StrictInt | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: dict[Text, Number] | None = None  # token id (as a string, as OpenAI sends it) -> bias in [-100, 100]
    user: Text | None = None
    # extensions
    top_k: StrictInt | None = None
    min_tokens: StrictInt = 0
    repetition_penalty: Number | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    slo_ttft_ms: Number | None = None  # this request's SLOs, instead of the cluster's
    slo_tpot_ms: Number | None = None

    def sampling_params(self, max_tokens: int | None, top_logprobs: int = 0) -> SamplingParams:
        """Raises InvalidRequestError naming the field for values the engine cannot serve."""
        stop = self.stop
        return SamplingParams(
            max_tokens=16 if max_tokens is None else max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            seed=self.seed,
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            min_tokens=self.min_tokens,
            logit_bias=self._logit_bias(),
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            top_logprobs=top_logprobs,
        )

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()) or len(key) > 10:
                raise InvalidRequestError("logit_bias", f"keys must be token ids, got {key[:40]!r}")
            pairs.append((int(key), float(bias)))
        return tuple(pairs)

    def check_choices(self, num_prompts: int) -> None:
        if self.n < 1:
            raise InvalidRequestError("n", f"must be >= 1, got {self.n}")
        if num_prompts > MAX_CHOICES:
            raise InvalidRequestError("prompt", f"at most {MAX_CHOICES} prompts per request, got {num_prompts}")
        if self.n * num_prompts > MAX_CHOICES:
            raise InvalidRequestError("n", f"{num_prompts} prompt(s) x n={self.n} choices exceeds the {MAX_CHOICES} choices one request may ask for")


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: StrictInt | None = 16
    echo: StrictBool = False
    logprobs: StrictInt | None = None  # the most likely tokens to return per position, besides the chosen one
    best_of: StrictInt | None = None
    suffix: Text | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one or several (a list of strings or of token-id lists)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return list(p)
        return [p]

    def check_supported(self) -> None:
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError("echo", "echo with logprobs asks for the prompt's logprobs, which this server does not compute")
        if self.best_of not in (None, self.n):
            raise InvalidRequestError("best_of", f"only best_of equal to n ({self.n}) is supported, got {self.best_of}")
        if self.suffix:
            raise InvalidRequestError("suffix", "is not supported by this server")
        self.check_choices(len(self.prompts()))


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Annotated[Text | list[TextPart] | None, _one_of("a string or a list of text parts")]
    name: Text | None = None
    tool_call_id: Text | None = None  # a tool message's; templates that know tools render it

    def for_template(self) -> dict[str, Any]:
        extra = {k: v for k, v in (("name", self.name), ("tool_call_id", self.tool_call_id)) if v}
        return {"role": self.role, "content": self.text(), **extra}

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ResponseFormat(_Body):
    type: Literal["text"]  # JSON modes and schemas are not supported: refused by name


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    # Fields clients send with their defaults, accepted where they ask for nothing this server
    # does not do: plain text, no tool calls, nothing stored; `metadata` is the client's own.
    response_format: ResponseFormat | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: StrictBool | None = None
    store: Literal[False] | None = None
    metadata: dict[Text, Text] | None = None
    chat_template_kwargs: dict[Text, Any] | None = None  # vLLM's: more variables for the chat template (e.g. enable_thinking)

    def check_supported(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs: true")
        self.check_choices(1)


# ---- responses -----------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, usage: dict[str, int] | None) -> "Usage":
        u = usage or {}
        p, c = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
        return cls(prompt_tokens=p, completion_tokens=c, total_tokens=p + c, prompt_tokens_details=PromptTokensDetails(cached_tokens=u.get("cached_tokens", 0)))


class CompletionLogprobs(BaseModel):
    """The legacy completions' shape: per token its text, logprob, the most likely tokens (and
    the chosen one) with theirs, and where the token starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatDelta
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    timings: dict[str, Any] | list[dict[str, Any]] | None = None  # extension: where the time went (a list: one per choice)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: dict[str, Any] | list[dict[str, Any]] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "splitserve"
    max_model_len: int  # vLLM's field: the longest prompt + output the cluster can take now


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
