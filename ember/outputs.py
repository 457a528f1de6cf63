"""What the engine hands back to its callers (LLM, AsyncLLM, the server): plain dataclasses."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # [(token_id, logprob)] best first
    rank: int | None = None  # 1 + the number of tokens more likely than token_id (prompt logprobs only)


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


class CompletionOutput:
    """One of the n sequences of a request; text and token_ids are cumulative.

    The engine's front end appends to one live CompletionOutput per sequence (token_ids and logprobs
    are extended in place, text is kept as pieces joined on first read), so a step costs the new
    tokens, never the history. A streaming reader takes the new part with `text_from(num_chars_sent)`
    and `logprobs[num_sent:]`.
    """

    def __init__(self, index: int, text: str = "", token_ids: list[int] | None = None,
                 finish_reason: str | None = None, stop_reason: str | int | None = None,
                 logprobs: list[TokenLogprob] | None = None, metrics: RequestMetrics | None = None):
        self.index = index
        self.token_ids = token_ids if token_ids is not None else []
        self.finish_reason = finish_reason  # None while running; "stop" | "length" | "abort"
        self.stop_reason = stop_reason  # the stop string or token id that ended it
        self.logprobs = logprobs
        self.metrics = metrics if metrics is not None else RequestMetrics()
        self.text = text

    # ---- text, kept as appended pieces ---------------------------------------------------------
    @property
    def text(self) -> str:
        if len(self._pieces) > 1:  # joined once per read, then kept as one piece
            self._pieces = ["".join(self._pieces)]
            self._starts = [0]
        return self._pieces[0] if self._pieces else ""

    @text.setter
    def text(self, value: str) -> None:
        self._pieces = [value] if value else []  # the text, in appended pieces
        self._starts = [0] if value else []  # char offset of each piece
        self.num_chars = len(value)

    def append_text(self, piece: str) -> None:
        if piece:
            self._starts.append(self.num_chars)
            self._pieces.append(piece)
            self.num_chars += len(piece)

    def text_from(self, start: int) -> str:
        """text[start:], reading only the pieces after `start` (what a stream has not sent yet)."""
        if start >= self.num_chars:
            return ""
        i = bisect_right(self._starts, start) - 1
        head = self._pieces[i][start - self._starts[i]:]
        return head + "".join(self._pieces[i + 1:]) if i + 1 < len(self._pieces) else head

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __eq__(self, other) -> bool:
        if not isinstance(other, CompletionOutput):
            return NotImplemented
        return (self.index, self.text, self.token_ids, self.finish_reason, self.stop_reason, self.logprobs,
                self.metrics) == (other.index, other.text, other.token_ids, other.finish_reason, other.stop_reason,
                                  other.logprobs, other.metrics)

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, "
                f"finish_reason={self.finish_reason!r}, stop_reason={self.stop_reason!r})")


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    # SamplingParams.prompt_logprobs: per prompt token, its teacher-forced logprob (None for the first token,
    # which has no context); filled as the prefill's chunks run. None when not asked for.
    prompt_logprobs: list[TokenLogprob | None] | None = None

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
