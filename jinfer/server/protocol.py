"""The OpenAI API's wire format, in vLLM's dialect: pydantic models of the requests and responses.

Requests ignore unknown fields and read null as "not given", as OpenAI and vLLM do; a bad value
fails validation with the field named, and `to_sampling_params` raises SamplingParams' own
complaints as a `ValidationError` too, so one handler (`validation_error_message`, `error_body`)
makes every 400. Responses serialise with a plain `model_dump_json()`: what OpenAI sends as null
(a running stream choice's `finish_reason`) stays null; only a stream delta drops unset fields.
`completion_logprobs` and `chat_logprobs` turn jinfer's per-token `Logprob` dicts into the two
OpenAI logprobs formats.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Callable, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      WrapValidator, computed_field, field_validator, model_serializer,
                      model_validator)
from pydantic_core import InitErrorDetails

from jinfer.api.outputs import Logprob
from jinfer.api.sampling_params import MAX_LOGPROBS, SamplingParams

# JSON has no -inf: lower logprobs are sent as this (vLLM's value).
MIN_LOGPROB = -9999.0

# The openai client's exception name for each status, which vLLM sends as the error's type.
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 409: "ConflictError", 422: "UnprocessableEntityError",
                429: "RateLimitError"}


def random_id(prefix: str) -> str:
    """A response id: "cmpl-<hex>" or "chatcmpl-<hex>"."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


def _one_of(description: str) -> WrapValidator:
    """Replaces a union's error per member by one: the value "must be <description>"."""
    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be {description}") from None
    return WrapValidator(validate)


TokenId = Annotated[int, Field(ge=0)]
Prompt = Annotated[Union[str, list[str], list[TokenId], list[list[TokenId]]], _one_of(
    "a string, a list of strings, a list of token ids (ints >= 0) or a list of such lists")]
Stop = Annotated[Union[str, list[str]], _one_of("a string or a list of strings")]
Penalty = Annotated[float, Field(ge=-2, le=2)]
NumLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class OpenAIModel(BaseModel):
    """Base of the wire models: unknown fields are ignored; NaN and infinities are refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _RequestModel(OpenAIModel):
    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_RequestModel):
    include_usage: bool = False


# Request fields that SamplingParams takes as they are.
_SAMPLING_FIELDS = frozenset((
    "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens",
    "skip_special_tokens", "include_stop_str_in_output"))


class _GenerationRequest(_RequestModel):
    """The fields both endpoints share: OpenAI's, then vLLM's extras (sent via extra_body)."""

    model: Optional[str] = None
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Optional[Stop] = None
    seed: Optional[int] = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    user: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_token_ids: Optional[list[TokenId]] = None
    prompt_logprobs: Optional[NumLogprobs] = None  # vLLM's: top logprobs per prompt token

    @field_validator("prompt_logprobs")
    @classmethod
    def _not_streamed(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("stream"):
            raise ValueError("is not available with stream=true")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (`stream_options.include_usage`)."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, **fields) -> SamplingParams:
        try:
            return SamplingParams(**self.model_dump(include=_SAMPLING_FIELDS), **fields)
        except ValueError as exc:
            raise _validation_error(type(self).__name__, exc) from None


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: Prompt
    echo: bool = False
    max_tokens: int = Field(16, ge=0)  # 0 only with echo: score the prompt (`echo_only`)
    logprobs: Optional[NumLogprobs] = None

    @field_validator("prompt")
    @classmethod
    def _no_empty_token_list(cls, prompt):
        if prompt == [] or (isinstance(prompt, list) and [] in prompt):
            raise ValueError("must not be empty, nor hold an empty list of token ids")
        return prompt

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_with_echo(cls, value: int, info: ValidationInfo) -> int:
        if value == 0 and not info.data.get("echo"):
            raise ValueError("must be >= 1 (0 is allowed only with echo=true, to score the prompt)")
        return value

    def prompts(self) -> list[Union[str, list[int]]]:
        """The batch of prompts, each a string or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens=0: one token is generated (the engine needs one); drop it."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The request's SamplingParams; `default_max_tokens` (the context's room) caps max_tokens.

        echo with logprobs asks for the prompt's logprobs too (`prompt_logprobs=logprobs`).
        """
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo:
            prompt_logprobs = self.logprobs
        max_tokens = 1 if self.echo_only else min(self.max_tokens, default_max_tokens)
        return self._sampling_params(max_tokens=max_tokens, logprobs=self.logprobs,
                                     prompt_logprobs=prompt_logprobs)


class TextPart(_RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(_RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Annotated[Union[str, list[TextPart]], _one_of(
        'a string or a list of {"type": "text", "text": ...} parts')]] = None
    name: Optional[str] = None

    def text(self) -> str:
        """The content as one string: text parts joined by newlines (as vLLM)."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # wins over max_tokens
    logprobs: bool = False
    top_logprobs: Optional[NumLogprobs] = None
    add_generation_prompt: bool = True

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int, info: ValidationInfo) -> int:
        if value > 0 and not info.data.get("logprobs"):
            raise ValueError("requires logprobs=true")
        return value

    def template_messages(self) -> list[dict]:
        """The messages as a chat template takes them: role, text content, and name if given."""
        return [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in self.messages]

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The request's SamplingParams; max_tokens defaults to, and is capped by,
        `default_max_tokens` (the context's room)."""
        requested = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return self._sampling_params(
            max_tokens=min(requested, default_max_tokens),
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            prompt_logprobs=self.prompt_logprobs)


# ---- Responses ----

class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @computed_field
    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class PromptLogprob(OpenAIModel):
    """vLLM's prompt_logprobs entry (jinfer's `Logprob`, -inf clamped)."""

    logprob: float
    rank: int
    decoded_token: Optional[str] = None


class CompletionLogprobs(OpenAIModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None  # null in a stream until the choice's last chunk
    stop_reason: Union[int, str, None] = None  # vLLM's: the stop string or token id that matched
    prompt_logprobs: Optional[list[Optional[dict[int, PromptLogprob]]]] = None


class CompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(CompletionResponse):
    """One chunk; the usage chunk (include_usage) has no choices."""

    usage: Optional[UsageInfo] = None


class ChatLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes


class ChatTokenLogprob(ChatLogprob):
    top_logprobs: list[ChatLogprob]


class ChatLogprobs(OpenAIModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: Optional[list[Optional[dict[int, PromptLogprob]]]] = None


class DeltaMessage(OpenAIModel):
    """A stream's piece of the message: role on the first chunk, content after, {} at the end."""

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionStreamResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "jinfer"
    max_model_len: Optional[int] = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int  # the HTTP status (as vLLM)


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# ---- Errors ----

def error_body(message: str, status_code: int, param: Optional[str] = None) -> dict:
    """OpenAI's error JSON, {"error": {message, type, param, code}}, for an HTTP status."""
    kind = _ERROR_TYPES.get(status_code,
                            "InternalServerError" if status_code >= 500 else "BadRequestError")
    info = ErrorInfo(message=message, type=kind, param=param, code=status_code)
    return ErrorResponse(error=info).model_dump()


def validation_error_message(errors: list[dict]) -> tuple[str, Optional[str]]:
    """A 400's message, one "field: problem" per error (`ValidationError.errors()`, or
    FastAPI's with the "body" location stripped), and the first bad top-level field."""
    parts = []
    for error in errors:
        loc = ".".join(str(part) for part in error["loc"])
        msg = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
        parts.append(msg if not loc or msg.startswith(loc) else f"{loc}: {msg}")
    param = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
    return "; ".join(parts), param


def _validation_error(title: str, exc: ValueError) -> ValidationError:
    """SamplingParams' ValueError, whose message starts with the field's name, as validation's."""
    field = str(exc).split(" ", 1)[0]
    loc = (field,) if field in SamplingParams.__dataclass_fields__ else ()
    return ValidationError.from_exception_data(
        title, [InitErrorDetails(type="value_error", loc=loc, input=None, ctx={"error": exc})])


# ---- Logprobs ----

def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def _token_text(token_id: int, logprob: Optional[Logprob], decode: Callable[[int], str]) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return decode(token_id)


def _by_rank(step: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(step.items(), key=lambda item: item[1].rank)


def completion_logprobs(token_ids: list[int], logprobs: list[Optional[dict[int, Logprob]]],
                        num_top: int, decode: Callable[[int], str],
                        initial_text_offset: int = 0) -> CompletionLogprobs:
    """The completions API's logprobs of `token_ids` (an echoed prompt's, then generated ones).

    `logprobs[i]` is jinfer's dict for token i (its own Logprob and the top ones), or None where
    there is none (a prompt's first token): then its logprob and top_logprobs are null.
    top_logprobs[i] holds the `num_top` most likely tokens and token i, by rank (as vLLM).
    text_offset[i] is where token i's text starts: `initial_text_offset` plus the text before.
    `decode(token_id)` names a token whose Logprob has no decoded_token.
    """
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = initial_text_offset
    for token_id, step in zip(token_ids, logprobs, strict=True):
        own = None if step is None else step[token_id]
        token = _token_text(token_id, own, decode)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        out.token_logprobs.append(None if own is None else _finite(own.logprob))
        out.top_logprobs.append(None if step is None else {
            _token_text(t, lp, decode): _finite(lp.logprob)
            for t, lp in _by_rank(step) if lp.rank <= num_top or t == token_id})
    return out


def _chat_logprob(token_id: int, logprob: Logprob, decode: Callable[[int], str]) -> dict:
    token = _token_text(token_id, logprob, decode)
    return {"token": token, "logprob": _finite(logprob.logprob), "bytes": list(token.encode())}


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], num_top: int,
                  decode: Callable[[int], str]) -> ChatLogprobs:
    """The chat API's logprobs of generated `token_ids`: each token's own, and its `num_top`
    most likely alternatives by rank (`logprobs[i]` is jinfer's dict for token i)."""
    content = []
    for token_id, step in zip(token_ids, logprobs, strict=True):
        top = [ChatLogprob(**_chat_logprob(t, lp, decode))
               for t, lp in _by_rank(step) if lp.rank <= num_top]
        content.append(ChatTokenLogprob(**_chat_logprob(token_id, step[token_id], decode),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)


def vllm_prompt_logprobs(logprobs: list[Optional[dict[int, Logprob]]]
                         ) -> list[Optional[dict[int, PromptLogprob]]]:
    """vLLM's `prompt_logprobs` response field (for the request field of that name)."""
    return [None if step is None else {
        t: PromptLogprob(logprob=_finite(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
        for t, lp in step.items()} for step in logprobs]
