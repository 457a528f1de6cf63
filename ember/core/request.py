"""One sequence as the scheduler sees it: its tokens, how many of them have KV in the cache, its
blocks, and its status. Torch-free plain data; the Scheduler and BlockManager mutate it, the
ModelRunner only reads it (between `schedule()` and `update()`)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ember.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # queued, holds no blocks
    RUNNING = enum.auto()  # admitted, holds blocks, scheduled every step the budget allows
    PREEMPTED = enum.auto()  # evicted for memory; back in the waiting queue, will recompute its KV
    FINISHED_STOPPED = enum.auto()  # eos, a stop token id, or a stop string (engine)
    FINISHED_LENGTH = enum.auto()  # max_tokens reached
    FINISHED_ABORTED = enum.auto()  # client went away or the engine refused it

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason for a finished status ("stop" | "length" | "abort"), else None."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Request:
    """A single completion sequence (the engine turns n > 1 into n Requests with the same prompt).

    Known tokens are prompt + outputs (+ spec_token_ids, drafts awaiting verification). Every step the
    scheduler lets `num_computed_tokens` catch up with them; the last sampled token has no KV until
    the next step feeds it back. Append outputs only through `append_output_token_ids`.
    """

    request_id: str  # unique among unfinished requests
    prompt_token_ids: list[int]  # never empty
    sampling_params: SamplingParams  # the per-sequence sampling settings (seed already offset for n > 1)
    eos_token_ids: set[int] = field(default_factory=set)  # finish on these unless sampling_params.ignore_eos
    max_tokens: int | None = None  # resolved output limit; None: sampling_params.max_tokens, else the
    # scheduler fills in max_seq_len - prompt length at add_request
    output_token_ids: list[int] = field(default_factory=list)  # sampled so far (survive preemption)
    num_computed_tokens: int = 0  # leading tokens whose KV is in the cache (prefix hits included)
    spec_token_ids: list[int] = field(default_factory=list)  # drafts to verify next step (set by a Proposer)
    status: RequestStatus = RequestStatus.WAITING
    arrival_time: float = field(default_factory=time.monotonic)  # time.monotonic() when it arrived
    cache_salt: str | None = None  # mixed into prefix hashes (e.g. the LoRA name): no sharing across salts
    lora_name: str | None = None  # the LoRA adapter this sequence runs with; None: the base model
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_prompt_logprobs: int = 0  # prompt logprobs handed out so far (a recomputed chunk is not sent twice)
    stop_reason: int | str | None = None  # stop token id or stop string that ended it (None for eos)
    block_ids: list[int] = field(default_factory=list)  # KV block table, owned by the BlockManager
    # the sliding-window layers' own table (ember.core.window_blocks), when the model keeps one; blocks wholly
    # outside the window are released and their entries set to NULL_BLOCK
    window_block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list, repr=False)  # chained digests of the full
    # blocks of known tokens, computed lazily by the BlockManager (tokens never change, so never stale)
    num_preemptions: int = 0  # times it was evicted and recomputed
    matcher: object | None = None  # ember.structured RequestMatcher (grammar state); None: unconstrained
    _all_token_ids: list[int] = field(init=False, repr=False)  # prompt + outputs, one list for slicing

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        self.eos_token_ids = set() if self.sampling_params.ignore_eos else set(self.eos_token_ids)
        if self.max_tokens is None:
            self.max_tokens = self.sampling_params.max_tokens
        self._all_token_ids = self.prompt_token_ids + self.output_token_ids

    # ---- tokens -------------------------------------------------------------------------------
    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + outputs (no drafts). The live list: slice it, never mutate it."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose KV the request wants: prompt + outputs + drafts."""
        return len(self._all_token_ids) + len(self.spec_token_ids)

    def append_output_token_ids(self, token_ids: list[int] | int) -> None:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.output_token_ids.extend(token_ids)
        self._all_token_ids.extend(token_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Known tokens [start, end) including drafts past num_tokens (what the runner feeds)."""
        n = len(self._all_token_ids)
        if end <= n:
            return self._all_token_ids[start:end]
        return self._all_token_ids[start:] + self.spec_token_ids[max(0, start - n):end - n]

    # ---- status -------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason
