"""Prompt lookup (b10 lookahead): propose what followed the longest earlier match of the context's suffix.

Each request keeps a `SuffixIndex`: n-gram -> the latest position where it ended, for n up to
`max_match`, fed incrementally as tokens arrive (prompt and outputs alike), so a lookup costs
`max_match` dictionary probes, never a rescan. The draft copies the tokens after the match; when the
match ends right before the suffix (a repeating pattern) the copy overlaps itself, LZ77-style, so a
period shorter than the draft still yields a full-length draft.
"""

from __future__ import annotations

from ember.spec.proposer import Draft, Proposer


class SuffixIndex:
    """n-gram (tuple) -> latest end position, over the n-grams ending before `num_indexed`."""

    def __init__(self, max_match: int):
        self.max_match = max_match
        self.last_end: dict[tuple[int, ...], int] = {}
        self.num_indexed = 0

    def extend(self, tokens: list[int], upto: int) -> None:
        for end in range(self.num_indexed, upto):
            for n in range(1, min(self.max_match, end + 1) + 1):
                self.last_end[tuple(tokens[end - n + 1:end + 1])] = end
        self.num_indexed = max(self.num_indexed, upto)

    def lookup(self, tokens: list[int], max_len: int, min_match: int = 1) -> list[int]:
        """Up to max_len tokens that followed the latest occurrence of the longest matching suffix."""
        found = self.continuations(tokens, max_len, 1, min_match)
        return found[0] if found else []

    def continuations(self, tokens: list[int], max_len: int, num: int, min_match: int = 1) -> list[list[int]]:
        """Up to `num` distinct continuations (max_len tokens each at most) of the context's suffix: what
        followed the latest occurrence of its longest match first, then of shorter matches."""
        n_tok = len(tokens)
        self.extend(tokens, n_tok - 1)  # every n-gram but the suffix itself
        found: list[list[int]] = []
        ends: set[int] = set()
        for n in range(min(self.max_match, n_tok - 1), min_match - 1, -1):
            end = self.last_end.get(tuple(tokens[n_tok - n:]))
            if end is None or end in ends:
                continue
            ends.add(end)
            out: list[int] = []
            for k in range(end + 1, end + 1 + max_len):
                out.append(tokens[k] if k < n_tok else out[k - n_tok])
            if out not in found:
                found.append(out)
                if len(found) >= num:
                    break
        return found


class PromptLookupProposer(Proposer):
    """A chain draft from the request's own context; its length adapts to recent acceptance."""

    def __init__(self, max_draft_len: int, max_match: int = 6, min_match: int = 1, initial_len: int = 4):
        self.max_draft_len = max_draft_len
        self.max_match = max_match
        self.min_match = min_match
        self.initial_len = min(initial_len, max_draft_len)
        self._index: dict[str, SuffixIndex] = {}
        self._draft_len: dict[str, int] = {}

    def propose(self, req, max_len: int) -> Draft | None:
        index = self._index.get(req.request_id)
        if index is None:
            index = self._index[req.request_id] = SuffixIndex(self.max_match)
        n = min(max_len, self._draft_len.get(req.request_id, self.initial_len))
        tokens = index.lookup(req.all_token_ids, n, self.min_match) if n > 0 else []
        return Draft(tokens) if tokens else None

    def on_verified(self, req, draft: Draft, num_run: int, accepted_nodes: list[int], node_argmax: list[int]) -> None:
        cur = self._draft_len.get(req.request_id, self.initial_len)
        a = len(accepted_nodes)
        # all accepted: the source is good, reach further; else stop just past where it went wrong
        cur = min(self.max_draft_len, cur * 2) if a >= num_run else max(2, a + 1)
        self._draft_len[req.request_id] = cur

    def free(self, request_id: str) -> None:
        self._index.pop(request_id, None)
        self._draft_len.pop(request_id, None)
