"""The OpenAI protocol's request and response bodies, as pydantic models.

Requests are strict: a wrong type is refused (no "10" for 10, no true for 1), numbers are finite
(Python's JSON parser accepts NaN and Infinity; JSON does not), strings are Unicode text (a lone
surrogate escape such as "\\ud800" would reach the tokenizer and the wire, which refuse it), and
a field this server does not know is refused by name rather than ignored. The validation errors
become 400s naming the field (router/http_api.py). Extensions beyond OpenAI's fields follow
vLLM's names (`top_k`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`).
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
    user: Text | None = None
    # extensions
    top_k: StrictInt | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    slo_ttft_ms: Number | None = None  # this request's SLOs, instead of the cluster's
    slo_tpot_ms: Number | None = None

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """Raises InvalidRequestError naming the field for values the engine cannot serve."""
        if self.n != 1:
            raise InvalidRequestError("n", f"only n=1 is supported, got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequestError(name, "is not supported by this server (only 0)")
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
        )


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: StrictInt | None = 16
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: Text | None = None

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise InvalidRequestError("prompt", f"only one prompt per request is supported, got {len(p)}")
            return p[0]
        return p

    def check_supported(self) -> None:
        if self.echo:
            raise InvalidRequestError("echo", "is not supported by this server")
        if self.logprobs is not None:
            raise InvalidRequestError("logprobs", "is not supported by this server")
        if self.best_of not in (None, 1):
            raise InvalidRequestError("best_of", "is not supported by this server")
        if self.suffix:
            raise InvalidRequestError("suffix", "is not supported by this server")


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Annotated[Text | list[TextPart] | None, _one_of("a string or a list of text parts")]
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None

    def check_supported(self) -> None:
        if self.logprobs:
            raise InvalidRequestError("logprobs", "is not supported by this server")
        if self.top_logprobs is not None:
            raise InvalidRequestError("top_logprobs", "is not supported by this server")


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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatDelta
    finish_reason: str | None
    logprobs: None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    timings: dict[str, Any] | None = None  # extension: where the request's time went


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: dict[str, Any] | None = None


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
