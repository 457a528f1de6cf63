"""Request bounds and the step from a protocol request to engine inputs.

`ServerSettings` gathers what the server reads from the config (host, port, key, limits), once.
The checks here raise ember errors naming the field and the limit; the route turns them into 400s
(or 404 for an unknown model). `sampling_params()` is the only place a request becomes
`SamplingParams`; the structured-output constraint is built in server/structured.py and passed in."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ember.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from ember.sampling_params import MAX_LOGPROBS, SamplingParams
from ember.server.errors import NotSupportedError
from ember.server.protocol import ChatCompletionRequest, CompletionRequest

TIMEOUT_HEADERS = (("request-timeout-ms", 1e-3), ("x-request-timeout", 1.0))  # (header, seconds per unit)
MAX_TIMEOUT_S = 24 * 3600.0


@dataclass
class ServerSettings:
    """Read once from the config: cfg.ember.{host, port, api_key, trust_request_chat_template,
    drain_timeout_s}, cfg.ember.limits.* (the bounds) and cfg.trt_llm.runtime.request_default_max_tokens."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no authentication
    trust_request_chat_template: bool = False
    strict_model_name: bool = False  # True: unknown `model` names are a 404; False: they serve the base model
    drain_timeout_s: float = 30.0  # SIGTERM: time in-flight requests get to finish
    max_n: int = 16  # choices per request
    max_tokens_limit: int | None = None  # None: only the context limit bounds max_tokens
    max_stop_sequences: int = 16
    max_stop_length: int = 256  # characters per stop string
    max_stop_token_ids: int = 64
    max_logprobs: int = MAX_LOGPROBS  # logprobs / top_logprobs
    max_body_bytes: int = 8 * 1024 * 1024
    max_prompt_tokens: int | None = None  # None: the context limit
    max_prompts: int = 64  # prompts in one /v1/completions request
    default_max_tokens: int | None = None  # trt_llm.runtime.request_default_max_tokens
    max_schema_bytes: int = 64 * 1024  # JSON schema / regex / grammar / choice text
    max_schema_depth: int = 32  # nesting depth of a JSON schema

    @classmethod
    def from_config(cls, cfg) -> "ServerSettings":
        ember = getattr(cfg, "ember", None)
        limits = getattr(ember, "limits", None)
        runtime = getattr(getattr(cfg, "trt_llm", None), "runtime", None)
        kw = {}
        for name in cls.__dataclass_fields__:
            for section in (ember, limits):  # a limit may sit under ember.limits or (flat) under ember
                value = getattr(section, name, None)
                if value is not None:
                    kw[name] = value
        default = getattr(runtime, "request_default_max_tokens", None)
        if default is not None:
            kw["default_max_tokens"] = default
        settings = cls(**kw)
        settings.max_logprobs = min(settings.max_logprobs, MAX_LOGPROBS)
        return settings


def resolve_lora(model: str | None, engine, strict: bool = False) -> str | None:
    """The LoRA adapter a request's `model` names (None: the base model). Any other name serves the base
    model, as on Baseten, unless `strict` (ember.strict_model_name), where it is a 404 as on vLLM."""
    if model is None or model == engine.served_model_name:
        return None
    if model in (getattr(engine, "lora_names", None) or []):
        return model
    if not strict:
        return None
    raise ModelNotFoundError(f"The model '{model}' does not exist; this server serves '{engine.served_model_name}'.", param="model")


def check_supported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """Valid OpenAI fields that this server does not serve: a clean 400, never silent misbehaviour."""
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise NotSupportedError("suffix is not supported.", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise NotSupportedError("best_of other than n is not supported.", param="best_of")


def check_limits(req: ChatCompletionRequest | CompletionRequest, s: ServerSettings) -> None:
    if req.n > s.max_n:
        raise InvalidRequestError(f"n={req.n} is above the limit of {s.max_n}.", param="n")
    name, max_tokens = requested_max_tokens(req)
    if max_tokens is not None and s.max_tokens_limit is not None and max_tokens > s.max_tokens_limit:
        raise InvalidRequestError(f"{name}={max_tokens} is above the limit of {s.max_tokens_limit}.", param=name)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > s.max_stop_sequences:
        raise InvalidRequestError(f"stop has {len(stops)} sequences; the limit is {s.max_stop_sequences}.", param="stop")
    for i, stop in enumerate(stops):
        if not stop or len(stop) > s.max_stop_length:
            raise InvalidRequestError(f"stop[{i}] must have 1 to {s.max_stop_length} characters.", param="stop")
    if req.stop_token_ids and len(req.stop_token_ids) > s.max_stop_token_ids:
        raise InvalidRequestError(f"stop_token_ids has {len(req.stop_token_ids)} ids; the limit is {s.max_stop_token_ids}.", param="stop_token_ids")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise InvalidRequestError("top_logprobs requires logprobs to be true.", param="top_logprobs")
            if req.top_logprobs > s.max_logprobs:
                raise InvalidRequestError(f"top_logprobs={req.top_logprobs} is above the limit of {s.max_logprobs}.", param="top_logprobs")
    elif req.logprobs is not None and req.logprobs > s.max_logprobs:
        raise InvalidRequestError(f"logprobs={req.logprobs} is above the limit of {s.max_logprobs}.", param="logprobs")
    if req.prompt_logprobs is not None and req.prompt_logprobs > s.max_logprobs:
        raise InvalidRequestError(f"prompt_logprobs={req.prompt_logprobs} is above the limit of {s.max_logprobs}.", param="prompt_logprobs")
    if max_tokens == 0 and not (isinstance(req, CompletionRequest) and req.echo):
        raise InvalidRequestError(f"{name}=0 generates nothing; it is only allowed with echo (to score the prompt).", param=name)
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise InvalidRequestError(f"min_tokens={req.min_tokens} is above {name}={max_tokens}.", param="min_tokens")


def check_logit_bias(req: ChatCompletionRequest | CompletionRequest, vocab_size: int | None) -> None:
    """logit_bias keys must be token ids of this vocabulary, values in [-100, 100] (OpenAI's bounds)."""
    for key, value in (req.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()):
            raise InvalidRequestError(f"logit_bias key {key!r} is not a token id; keys must be integer token ids as strings.", param="logit_bias")
        if vocab_size is not None and int(key) >= vocab_size:
            raise InvalidRequestError(f"logit_bias token id {key} is out of range; the vocabulary has {vocab_size} tokens.", param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise InvalidRequestError(f"logit_bias value {value} for token {key} must be between -100 and 100.", param="logit_bias")


def requested_max_tokens(req) -> tuple[str, int | None]:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return "max_completion_tokens", req.max_completion_tokens
    return "max_tokens", req.max_tokens


def check_prompt(token_ids: list[int], s: ServerSettings, max_model_len: int, vocab_size: int | None, param: str) -> None:
    if not token_ids:
        raise InvalidRequestError("The prompt is empty; it must have at least one token.", param=param)
    limit = s.max_prompt_tokens if s.max_prompt_tokens is not None else max_model_len
    if len(token_ids) > min(limit, max_model_len):
        if limit < max_model_len:
            raise InvalidRequestError(f"The prompt has {len(token_ids)} tokens; the limit is {limit}.", param=param)
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has {len(token_ids)} tokens. "
            "Please reduce the length of the prompt.",
            param=param,
        )
    if vocab_size is not None:
        bad = next((t for t in token_ids if t >= vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"Token id {bad} is out of range; the vocabulary has {vocab_size} tokens.", param=param)


COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def resolve_max_tokens(req, num_prompt_tokens: int, max_model_len: int, s: ServerSettings) -> int:
    """The output budget: the request's; else runtime.request_default_max_tokens; else OpenAI's default
    (16 for completions, the rest of the context for chat); never past the context."""
    name, requested = requested_max_tokens(req)
    room = max_model_len - num_prompt_tokens
    if requested is not None:
        if requested > room:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, {requested} in the completion). "
                "Please reduce the length of the prompt or completion.",
                param=name,
            )
        return requested
    if room < 1:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has {num_prompt_tokens} tokens, "
            "which leaves no room for the completion. Please reduce the length of the prompt.",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
        )
    default = s.default_max_tokens
    if default is None and isinstance(req, CompletionRequest):
        default = COMPLETIONS_DEFAULT_MAX_TOKENS
    budget = room if default is None else min(default, room)
    return budget if s.max_tokens_limit is None else min(budget, s.max_tokens_limit)


def sampling_params(req, max_tokens: int, logprobs: int | None, structured=None,
                    prompt_logprobs: int | None = None, defaults: dict | None = None) -> SamplingParams:
    """prompt_logprobs: what the route needs beyond the request's own `prompt_logprobs` (echo with logprobs).
    defaults: the model's sampling defaults (AsyncLLM.sampling_defaults) for the fields the request left out or
    sent as null; past them, OpenAI's (temperature 1, top_p 1) and no top-k / min-p / repetition penalty."""
    sent = req.model_fields_set  # an explicit null never lands here: the request models drop null keys first
    defaults = defaults or {}

    def pick(name: str, openai_default):
        return getattr(req, name) if name in sent else defaults.get(name, openai_default)

    asked = [k for k in (prompt_logprobs, req.prompt_logprobs) if k is not None]
    prompt_logprobs = max(asked) if asked else None
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(
            n=req.n,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", -1),
            min_p=pick("min_p", 0.0),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0),
            seed=req.seed,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logit_bias=req.logit_bias,
            prompt_logprobs=prompt_logprobs,
            structured=structured,
        )
    except ValueError as exc:  # SamplingParams names the field first: "top_k=0 must be ..."
        text = str(exc)
        raise InvalidRequestError(text + ".", param=text.split("=", 1)[0] if "=" in text else None) from exc


def parse_deadline(headers) -> tuple[float | None, float | None]:
    """(monotonic deadline, timeout in seconds) from `Request-Timeout-Ms` or `X-Request-Timeout`
    (seconds); (None, None) when neither is sent."""
    for header, unit in TIMEOUT_HEADERS:
        raw = headers.get(header)
        if raw is None:
            continue
        try:
            timeout = float(raw) * unit
        except ValueError:
            timeout = math.nan
        if not (0 < timeout <= MAX_TIMEOUT_S):
            raise InvalidRequestError(
                f"The {header} header must be a positive number of {'milliseconds' if unit < 1 else 'seconds'} up to one day.", param=header
            )
        return time.monotonic() + timeout, timeout
    return None, None
