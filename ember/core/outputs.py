"""What the Scheduler hands the ModelRunner each step: plain data, one entry per scheduled request.

For each ScheduledRequest the runner feeds tokens `token_ids()` at positions `positions()` (the KV of
positions < num_computed_tokens is already in the cache, in `block_ids`), writes their K/V to the
slots `block_ids[p // block_size] * block_size + p % block_size`, and, when `is_sampling`, samples
from the last `num_draft_tokens + 1` positions (verifying drafts) and returns the accepted tokens
plus one more in `sampled[request_id]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.core.request import Request


@dataclass
class ScheduledRequest:
    request: Request  # live object: read tokens and sampling params from it, do not mutate it
    num_computed_tokens: int  # KV already cached: the position of the first new token
    num_new_tokens: int  # tokens to run this step, starting at num_computed_tokens, drafts included
    num_draft_tokens: int  # of those, the trailing drafts (request.spec_token_ids[:num_draft_tokens])
    block_ids: list[int]  # the request's whole block table after allocation (a copy)
    is_sampling: bool  # this chunk reaches the end of prompt + outputs: sample from its last position(s)

    def token_ids(self) -> list[int]:
        """The num_new_tokens input ids: prompt/output tokens, then the drafts."""
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
    preempted_ids: list[str] = field(default_factory=list)  # evicted this step (blocks freed, will recompute)
    finished_ids: list[str] = field(default_factory=list)  # finished or aborted since the previous
    # schedule(): the runner may drop per-request state (generators, grammar matchers) for these

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
