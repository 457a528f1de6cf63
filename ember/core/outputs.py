"""What the Scheduler hands the ModelRunner each step: plain data, one entry per scheduled request,
carrying only what changed since the runner last saw that request (vLLM v1's split).

The runner keeps a persistent row per running request. A request it has not seen (first admission, or
resumption after a preemption) arrives once with a `NewRequestData` (prompt, outputs so far, sampling
params). Every step after, its `ScheduledRequest` carries only the changes: the tokens appended since
(`new_token_ids`: the accepted outputs), the block ids appended to its table (`new_block_ids`, written
from `block_ids_start`, which drops trailing blocks a draft rollback released), and where this step's
chunk starts (`num_computed_tokens`). The runner then feeds known tokens [num_computed_tokens,
num_computed_tokens + num_new_tokens - num_draft_tokens) followed by `draft_token_ids`, writes their K/V
to slots `block_table[p // block_size] * block_size + p % block_size`, and, when `is_sampling`, samples
from the last `num_draft_tokens + 1` positions and returns the accepted tokens plus one more.

Rows end with the ids in `finished_ids` and `preempted_ids` (the runner frees them before this step's
requests). Nothing here grows with a request's length: a step costs its new tokens and new blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.core.request import Request
from ember.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request's data the runner keeps for as long as it runs: sent once per admission."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # outputs so far: empty unless it resumes after a preemption
    sampling_params: SamplingParams
    eos_token_ids: list[int]  # sorted; banned before min_tokens (empty when ignore_eos)
    lora_name: str | None  # the adapter it runs with; None: the base model


@dataclass
class ScheduledRequest:
    request: Request  # the live object, for the engine side (update, outputs, grammar); the runner never
    # reads it, and it is dropped when the step is pickled for tensor-parallel workers
    num_computed_tokens: int  # KV already cached: the position of the first new token
    num_new_tokens: int  # tokens to run this step, starting at num_computed_tokens, drafts included
    num_draft_tokens: int  # of those, the trailing drafts
    is_sampling: bool  # this chunk reaches the end of prompt + outputs: sample from its last position(s)
    request_id: str = ""  # filled from `request` when left empty
    new_request: NewRequestData | None = None  # set the first step the runner sees this request
    new_token_ids: list[int] = field(default_factory=list)  # tokens appended since the runner last saw it
    new_block_ids: list[int] = field(default_factory=list)  # block ids to write at block_ids_start onwards
    block_ids_start: int = 0  # the runner's block table row keeps its first block_ids_start ids
    # the same for the sliding-window layers' table (ember.core.window_blocks); empty when the model has none
    new_window_block_ids: list[int] = field(default_factory=list)
    window_block_ids_start: int = 0
    draft_token_ids: list[int] = field(default_factory=list)  # the num_draft_tokens drafts to verify

    def __post_init__(self) -> None:
        if not self.request_id and self.request is not None:
            self.request_id = self.request.request_id

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["request"] = None  # engine-side object (grammar matchers, histories): never crosses processes
        return state

    def token_ids(self) -> list[int]:
        """The num_new_tokens input ids (engine side, from the live request): known tokens, then drafts."""
        start = self.num_computed_tokens
        return self.request.token_ids_slice(start, start + self.num_new_tokens)

    def positions(self) -> range:
        return range(self.num_computed_tokens, self.num_computed_tokens + self.num_new_tokens)

    @property
    def num_sampled_positions(self) -> int:
        """Positions (at the end of the chunk) whose logits are needed: drafts + 1, or 0."""
        return self.num_draft_tokens + 1 if self.is_sampling else 0

    @property
    def seq_len(self) -> int:
        """KV length of the sequence after this step (cached + new)."""
        return self.num_computed_tokens + self.num_new_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # batch order: running first, FCFS
    num_batched_tokens: int = 0  # sum of num_new_tokens, <= max_num_tokens
    preempted_ids: list[str] = field(default_factory=list)  # evicted this step (blocks freed, will recompute):
    # the runner drops their rows and gets them again as new requests when they resume
    finished_ids: list[str] = field(default_factory=list)  # finished or aborted since the previous
    # schedule(): the runner drops their rows and per-request state (generators)
    # Filled by the engine side between schedule() and execute() (ember.structured.manager): the grammar
    # bitmask over this step's sampled positions, or None when no scheduled request is constrained.
    grammar: object | None = None

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
