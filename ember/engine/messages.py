"""What crosses the boundary between the front end (tokenization, detokenization, stop strings, n > 1
grouping, accumulation) and the EngineCore (scheduler, runner, KV cache): plain, picklable dataclasses.

Outputs are deltas: per step and per sequence only the tokens sampled in that step, their logprobs and,
once, why the sequence finished. Whoever needs the whole history accumulates it (ember.engine.output_processor).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.errors import EmberError
from ember.outputs import TokenLogprob
from ember.sampling_params import SamplingParams


@dataclass
class EngineCoreRequest:
    """One sequence to run (a request with n > 1 is n of these, ids `rid#i`); validated by the front end."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams  # the sequence's own (seed already offset for n > 1)
    eos_token_ids: set[int]  # empty when ignore_eos
    max_tokens: int  # resolved output limit
    arrival_time: float  # time.monotonic() of the front end; same clock on one host
    cache_salt: str | None = None
    lora_name: str | None = None


@dataclass
class EngineCoreOutput:
    """One sequence's step: only what is new."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    new_prompt_logprobs: list[TokenLogprob] | None = None  # the next prompt tokens' logprobs (prompt_logprobs)
    finish_reason: str | None = None  # "stop" | "length" | "abort", once, on the last output
    stop_reason: int | str | None = None  # stop token id (None for eos)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_draft_tokens: int = 0  # speculative tokens verified this step
    num_accepted_tokens: int = 0  # of those, accepted
    step_start_time: float | None = None  # time.monotonic() when this step began (one clock for the host's processes)


@dataclass
class EngineStats:
    """The core's counters and gauges for /metrics; sent with the outputs (nothing reads core state)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use
    num_free_blocks: int = 0
    num_blocks: int = 0
    block_size: int = 0  # tokens per KV block
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_draft_tokens_total: int = 0
    num_accepted_tokens_total: int = 0
    max_loras: int = 0  # LoRA adapters one batch may mix; 0: LoRA is off
    running_lora_names: tuple[str, ...] = ()  # adapters of running requests (sorted, distinct)
    waiting_lora_names: tuple[str, ...] = ()  # adapters of waiting requests (sorted, distinct)


@dataclass
class EngineCoreOutputs:
    """One message from the core: a step's deltas, requests it refused, and its stats after the step."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    errors: list[tuple[str, "ErrorInfo"]] = field(default_factory=list)  # (request id, why it was refused)
    stats: EngineStats | None = None


@dataclass
class EngineInfo:
    """What the front end learns from the core once, at start-up."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    lora_names: list[str]
    has_lora: bool  # adapters are served (so run-time loading is possible)
    chat_template: str | None = None
    sampling_defaults: dict = field(default_factory=dict)  # the checkpoint's under ember.sampling_defaults


@dataclass
class ErrorInfo:
    """An EmberError as data (exception classes with keyword-only fields do not pickle reliably)."""

    kind: str  # the class name in ember.errors
    message: str
    param: str | None = None
    retry_after: float | None = None

    @classmethod
    def of(cls, exc: BaseException) -> "ErrorInfo":
        if isinstance(exc, EmberError):
            return cls(type(exc).__name__, exc.message, exc.param, getattr(exc, "retry_after", None))
        return cls("EmberError", f"{type(exc).__name__}: {exc}")

    def to_exception(self) -> EmberError:
        from ember import errors

        klass = getattr(errors, self.kind, errors.EmberError)
        if klass is errors.QueueFullError:
            return klass(self.message, retry_after=self.retry_after or 1.0)
        return klass(self.message, param=self.param)
