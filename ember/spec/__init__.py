"""Speculative decoding: proposers (lookahead, prompt lookup), draft trees, and exact verification.

The engine calls a `Speculator` at two named points of its step (ember.spec.speculator); the runner
runs drafts as ordinary tokens (tree drafts with a custom attention mask, ember.spec.tree) and
verifies them (ember.spec.verify).
"""

from ember.spec.lookahead import LookaheadProposer
from ember.spec.prompt_lookup import PromptLookupProposer, SuffixIndex
from ember.spec.proposer import Draft, Proposer
from ember.spec.speculator import NoSpeculator, Speculator, build_speculator

__all__ = ["Draft", "LookaheadProposer", "NoSpeculator", "PromptLookupProposer", "Proposer", "Speculator",
           "SuffixIndex", "build_speculator"]
