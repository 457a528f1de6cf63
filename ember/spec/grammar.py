"""Grammar-constrained speculation: the bitmask of every verified position of chain drafts.

Row k of a request sees its first k drafts accepted, so its mask is the matcher's state after them
(ember.structured.bitmask.fill_draft_bitmask advances the matcher through the drafts and rolls it
back). The Speculator gives constrained requests chain drafts only; the engine advances the matcher
with the tokens that verification emits, as without speculation.
"""

from __future__ import annotations

import torch

from ember.structured.bitmask import allocate_bitmask, fill_draft_bitmask


def build_draft_bitmask(matchers: list, drafts: list[list[int]], vocab_size: int
                        ) -> tuple[torch.Tensor, list[int]] | None:
    """(bitmask [R, ceil(V/32)] int32, rows to mask) over the verification rows (drafts + 1 per
    request, in order), or None when no request is constrained."""
    if all(m is None for m in matchers):
        return None
    bitmask = allocate_bitmask(sum(len(d) + 1 for d in drafts), vocab_size)
    rows, start = [], 0
    for matcher, draft in zip(matchers, drafts):
        if matcher is not None:
            fill_draft_bitmask(matcher, draft, bitmask, start)
            rows.extend(range(start, start + len(draft) + 1))
        start += len(draft) + 1
    return (bitmask, rows) if rows else None
