"""The StructuredOutputManager: the one owner of grammar work in a step, on the engine side.

Grammar matchers live with the scheduler's requests (`Request.matcher`); only this manager touches them.
Between `Scheduler.schedule()` and the runner it fills `SchedulerOutput.grammar` with a `GrammarBitmask`
over the step's sampled positions (a request verifying k drafts gets k + 1 rows, row j masked by the
grammar state after its first j drafts); after the step it advances each matcher with the tokens the
step accepted. The runner receives the bitmask tensor and never sees a matcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ember.structured.backend import GrammarBackend
from ember.structured.bitmask import advance, allocate_bitmask, fill_draft_bitmask


@dataclass
class GrammarBitmask:
    """One step's grammar masks, in the order of the step's sampled positions (batch order, drafts + 1
    rows per sampling request)."""

    bitmask: torch.Tensor  # [R, ceil(V / 32)] int32 on the host: bit j of row i set when token j is allowed
    rows: list[int]  # the rows a grammar constrains (the others are all-allowed)
    completed_ids: set[str] = field(default_factory=set)  # requests whose grammar is complete: only EOS
    # may follow, so min_tokens must not ban it


class StructuredOutputManager:
    """Creates matchers, builds each step's bitmask and advances matchers with accepted tokens."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self.vocab_size = vocab_size
        # built eagerly: requests are validated on the server's thread, steps run on the engine's
        self.backend = GrammarBackend(tokenizer, vocab_size, sorted(eos_token_ids))

    def new_matcher(self, spec):
        """A matcher for one sequence (compiled once per spec; a bad grammar raises a 400 here)."""
        return self.backend.new_matcher(spec)

    def grammar_bitmask(self, sched_out) -> GrammarBitmask | None:
        """The masks of `sched_out`'s sampled positions, or None when no sampling request is constrained."""
        items = [item for item in sched_out.scheduled if item.is_sampling]
        if all(item.request.matcher is None for item in items):
            return None
        bitmask = allocate_bitmask(sum(item.num_sampled_positions for item in items), self.vocab_size)
        rows, completed, start = [], set(), 0
        for item in items:
            matcher = item.request.matcher
            k = item.num_sampled_positions
            if matcher is not None:
                if item.num_draft_tokens:
                    fill_draft_bitmask(matcher, item.draft_token_ids, bitmask, start)
                    rows.extend(range(start, start + k))
                elif matcher.fill_bitmask(bitmask, start):
                    rows.append(start)
                if matcher.is_completed():
                    completed.add(item.request_id)
            start += k
        return GrammarBitmask(bitmask, rows, completed) if rows or completed else None

    @staticmethod
    def advance(request, token_ids: Sequence[int]) -> bool:
        """Feed a request's accepted tokens to its matcher. True when the request must finish (its grammar
        terminated, or refused a token); False for unconstrained requests."""
        if request.matcher is None or not token_ids:
            return False
        return advance(request.matcher, token_ids)
