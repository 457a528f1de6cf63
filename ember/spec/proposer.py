"""The Proposer interface: a source of draft tokens for one request, asked once per step.

A proposer returns a `Draft` (tokens, and for a tree one parent per token) and hears back what the
target model did with it (`on_verified`). Proposers never see torch or the batch; the Speculator
decides who may speculate and how much, the runner verifies (ember.spec.verify).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Draft:
    token_ids: list[int]  # topologically ordered: parents before children
    parents: list[int] | None = None  # per token: index of its parent draft, -1 for the root; None: a chain

    def __len__(self) -> int:
        return len(self.token_ids)

    def truncated(self, n: int) -> "Draft":
        """The first n tokens (still a valid tree: parents come first)."""
        return Draft(self.token_ids[:n], None if self.parents is None else self.parents[:n])

    def chain_prefix(self) -> "Draft":
        """The leading chain (draft i the child of draft i - 1): what grammar-constrained requests verify."""
        if self.parents is None:
            return self
        n = next((i for i, p in enumerate(self.parents) if p != i - 1), len(self.parents))
        return Draft(self.token_ids[:n])


class Proposer:
    def propose(self, req, max_len: int) -> Draft | None:
        """Drafts to follow req.all_token_ids (at most max_len of them), or None."""
        raise NotImplementedError

    def on_verified(self, req, draft: Draft, num_run: int, accepted_nodes: list[int], node_argmax: list[int]) -> None:
        """After the step: `num_run` leading drafts ran, `accepted_nodes` (draft indices, root first)
        were accepted, `node_argmax[0]` / `[1 + i]` are the argmax at the root / after draft i.
        req.all_token_ids already holds the accepted tokens and the bonus."""

    def free(self, request_id: str) -> None:
        """Forget a finished request."""
