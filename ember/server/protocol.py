"""Request and response bodies of the HTTP API, mirroring OpenAI's, as pydantic models.

Requests: static bounds (ranges of sampling values) live here, so a violation is a 400 naming the
field; limits that come from the config (n, max_tokens, stop count, logprobs) are checked in
server/limits.py. Unknown fields are accepted and ignored, as vLLM does, so newer SDKs keep working.
OpenAI's nullable fields accept an explicit `null` as "absent" (their default applies): the request
models drop null-valued keys before validation.
Structured-output fields (`response_format`, `regex`, `grammar`, `choice`, `tools`, `tool_choice`)
are parsed here and validated in server/structured.py (which names the field in its 400s)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

INT64 = 2**63 - 1
NonNegInt = Annotated[int, Field(ge=0, le=INT64)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        # OpenAI marks most request fields nullable; null means "use the default", as in OpenAI's API.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class FunctionCall(_Request):
    name: str
    arguments: str = "{}"


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolFunction(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: ToolFunction


class ContentPart(_Request):
    """One part of a list-valued `content`; only "text" parts are served (chat.py refuses others)."""

    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class _SamplingFields(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions (OpenAI's plus vLLM-style extras).
    `X | None = default`: nullable in OpenAI's spec (null means the default)."""

    model: str | None = None  # None or any name but an adapter's: the served model (see limits.resolve_lora)
    n: int | None = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)  # 0: greedy
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias added to its logit, -100..100
    user: str | None = None
    response_format: ResponseFormat | None = None
    # extras (vLLM-compatible names)
    top_k: int | None = Field(-1, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int | None = Field(0, ge=0)
    ignore_eos: bool | None = False
    stop_token_ids: list[NonNegInt] | None = None
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    prompt_logprobs: int | None = Field(None, ge=0)  # vLLM's: each prompt token's logprob and the top k alternatives


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool | None = True
    chat_template: str | None = None  # refused unless ember.trust_request_chat_template
    chat_template_kwargs: dict[str, Any] | None = None


PromptInput = str | list[str] | list[NonNegInt] | list[list[NonNegInt]]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput | None = None  # None (absent or null): OpenAI's "<|endoftext|>", here the BOS (else EOS) token
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt, generate nothing
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[NonNegInt]


# ---- responses ---------------------------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(_Response):
    content: list[TokenLogprobOut] | None = None
    refusal: list[TokenLogprobOut] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None  # the model's <think> text, when it reasons (vLLM's field name)


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


def _now() -> int:
    return int(time.time())


class PromptLogprob(_Response):
    """One entry of vLLM's `prompt_logprobs`: {token id: this} per prompt position (null for the first)."""

    logprob: float
    rank: int | None = None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda v: v is None)  # vLLM's extra, when asked for


class ChatStreamChoice(_Response):
    index: int
    delta: dict[str, Any]  # only the keys that changed, as OpenAI sends them
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda v: v is None)  # vLLM's extra, when asked for


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "ember"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    """Every error body, OpenAI's shape (ember.server.errors.error_body)."""

    error: ErrorDetail
