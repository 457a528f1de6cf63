"""What the engine hands back to its callers (LLM, AsyncLLM, the server): plain dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # [(token_id, logprob)] best first


@dataclass
class RequestMetrics:
    arrival_time: float = 0.0  # time.monotonic() when added
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_steps: int = 0  # forward passes this request took part in
    num_decode_steps: int = 0  # steps that produced at least one output token
    num_draft_tokens: int = 0  # speculative tokens proposed
    num_accepted_tokens: int = 0  # speculative tokens accepted
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed speculative tokens (None before any draft)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_tokens_per_step(self) -> float | None:
        """Output tokens per step that produced any (1.0 without speculation)."""
        if not self.num_decode_steps:
            return None
        return (self.num_decode_steps + self.num_accepted_tokens) / self.num_decode_steps

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One of the n sequences of a request; text and token_ids are cumulative."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0

    # convenience for the single-sequence case: outs[0].text etc. (DESIGN 1.4)
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def metrics(self) -> RequestMetrics:
        return self.outputs[0].metrics
