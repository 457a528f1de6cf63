"""Lookahead decoding (Fu et al. 2024): a Jacobi window, an n-gram pool, and verification branches,
all in the same forward pass as the request's next token.

Per request, each step builds one draft tree under the root (the last real token, at position L-1):
- verification branches: the prompt-lookup chain (when b10 lookahead is on) and up to G candidates of
  N-1 tokens, merged into a trie (shared prefixes once): first what followed the latest occurrences of
  the context's longest suffix matches, then n-grams from the pool whose key is the root token;
- the lookahead branch: a 2D window of N-1 levels x W columns. Token (r, c) sits at position L+c+r
  and its parent is (r-1, c), or (0, c-1) on level 0: it attends to level 0's earlier columns and to
  its own column's lower levels, the causal context Jacobi iteration gives it, and is blind to the
  verification branches (and they to it). Its outputs are not verified as such (any window token
  the target happens to accept is correct, as every tree node is), they feed the pool: column c of a
  full window and the top level's output form an N-gram (level0[c], ..., level{N-2}[c], out[c]),
  keyed by level0[c]; then level 0 is dropped and the outputs become the new top level.
The pool is also fed every N-gram of the context (prompt and outputs) as tokens arrive.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field

from ember.spec.prompt_lookup import PromptLookupProposer, SuffixIndex
from ember.spec.proposer import Draft, Proposer


_MAX_MATCH = 4  # longest context suffix matched when ranking verification candidates


class NgramPool:
    """first token -> the latest `cap` continuations (tuples of N-1 tokens), most recent last."""

    def __init__(self, cap: int):
        self.cap = cap
        self.by_first: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def add(self, ngram: tuple[int, ...]) -> None:
        od = self.by_first.setdefault(ngram[0], OrderedDict())
        rest = ngram[1:]
        od.pop(rest, None)
        od[rest] = None
        if len(od) > self.cap:
            od.popitem(last=False)

    def candidates(self, first: int, num: int) -> list[tuple[int, ...]]:
        od = self.by_first.get(first)
        return list(reversed(od))[:num] if od else []


class TreeBuilder:
    """Accumulates drafts with parents; chains added under the root are merged into a trie."""

    def __init__(self):
        self.token_ids: list[int] = []
        self.parents: list[int] = []
        self._trie: dict[tuple[int, int], int] = {}  # (parent, token) -> node, verification branches only

    def add_chain(self, tokens, max_nodes: int) -> list[int]:
        nodes, parent = [], -1
        for t in tokens:
            node = self._trie.get((parent, t))
            if node is None:
                if len(self.token_ids) >= max_nodes:
                    break
                node = self._add(t, parent)
                self._trie[(parent, t)] = node
            nodes.append(node)
            parent = node
        return nodes

    def _add(self, token: int, parent: int) -> int:
        self.token_ids.append(token)
        self.parents.append(parent)
        return len(self.token_ids) - 1

    def draft(self) -> Draft:
        is_chain = all(p == i - 1 for i, p in enumerate(self.parents))
        return Draft(list(self.token_ids), None if is_chain else list(self.parents))


@dataclass
class _State:
    pool: NgramPool
    levels: list[list[int]]  # window levels, oldest first, each of W tokens
    num_pooled: int = 0  # context tokens whose N-grams (ending there) are pooled
    chain_len: int = 0  # prompt-lookup chain length in the last draft
    window_start: int = -1  # first window node in the last draft (-1: no window)
    sizes: tuple[int, int, int] = (0, 0, 0)  # W, N, G the request runs with
    index: SuffixIndex = field(default_factory=lambda: SuffixIndex(_MAX_MATCH))  # context n-gram -> latest end


class LookaheadProposer(Proposer):
    def __init__(self, windows_size: int, ngram_size: int, verification_set_size: int,
                 prompt_lookup: PromptLookupProposer | None = None, pool_cap: int | None = None):
        self.max_w, self.max_n, self.max_g = windows_size, ngram_size, verification_set_size
        self.prompt_lookup = prompt_lookup
        self.pool_cap = pool_cap
        self._states: dict[str, _State] = {}

    def sizes(self, params) -> tuple[int, int, int]:
        """W, N, G for a request: its overrides (validated to be within the maxima) or the engine's."""
        w = params.lookahead_windows_size if params.lookahead_windows_size is not None else self.max_w
        n = params.lookahead_ngram_size if params.lookahead_ngram_size is not None else self.max_n
        g = params.lookahead_verification_set_size if params.lookahead_verification_set_size is not None else self.max_g
        return w, n, g

    def _state(self, req) -> _State:
        st = self._states.get(req.request_id)
        if st is None:
            w, n, g = self.sizes(req.sampling_params)
            rng = random.Random(len(req.prompt_token_ids))  # deterministic: a seeded request stays reproducible
            init = [rng.choice(req.prompt_token_ids) for _ in range(w)]
            st = self._states[req.request_id] = _State(NgramPool(self.pool_cap or max(4, g)), [init] if w and n >= 2 else [],
                                                       sizes=(w, n, g))
        return st

    def propose(self, req, max_len: int) -> Draft | None:
        st = self._state(req)
        w, n, g = st.sizes
        tokens = req.all_token_ids
        if n >= 2:
            for end in range(max(st.num_pooled, n - 1), len(tokens)):
                st.pool.add(tuple(tokens[end - n + 1:end + 1]))
        st.num_pooled = len(tokens)
        tb = TreeBuilder()
        st.chain_len = 0
        use_pl = self.prompt_lookup is not None and req.sampling_params.enable_b10_lookahead is not False
        if use_pl:
            chain = self.prompt_lookup.propose(req, max_len)
            st.chain_len = len(tb.add_chain(chain.token_ids, max_len)) if chain else 0
        if n >= 2 and g:
            # The context's own continuations first (what followed the latest occurrences of its longest
            # suffix matches: on CPU every draft token costs compute, so the likeliest go first), then the
            # pool's n-grams keyed by the last token (the window's guesses and older context), most recent first.
            cands = st.index.continuations(tokens, n - 1, g)
            for cand in st.pool.candidates(tokens[-1], g):
                if len(cands) >= g:
                    break
                if list(cand) not in cands:
                    cands.append(list(cand))
            for cand in cands:
                tb.add_chain(cand, max_len)
        st.window_start = -1
        window_size = len(st.levels) * w
        if window_size and len(tb.token_ids) + window_size <= max_len:
            st.window_start = len(tb.token_ids)
            for r, level in enumerate(st.levels):
                for c, t in enumerate(level):
                    parent = st.window_start + (r - 1) * w + c if r else (st.window_start + c - 1 if c else -1)
                    tb._add(t, parent)
        return tb.draft() if tb.token_ids else None

    def on_verified(self, req, draft: Draft, num_run: int, accepted_nodes: list[int], node_argmax: list[int]) -> None:
        st = self._states.get(req.request_id)
        if st is None:
            return
        if st.chain_len:
            on_chain = 0
            while on_chain < len(accepted_nodes) and accepted_nodes[on_chain] == on_chain < st.chain_len:
                on_chain += 1
            self.prompt_lookup.on_verified(req, draft.truncated(st.chain_len), min(num_run, st.chain_len),
                                           accepted_nodes[:on_chain], node_argmax)
        w, n, _ = st.sizes
        if st.window_start < 0 or num_run < len(draft):
            return  # the window did not run (budget): it stays as it was
        top = st.window_start + (len(st.levels) - 1) * w
        outs = [node_argmax[1 + top + c] for c in range(w)]
        if len(st.levels) >= n - 1:
            for c in range(w):
                st.pool.add(tuple(level[c] for level in st.levels) + (outs[c],))
            st.levels = st.levels[1:] + [outs]
        else:
            st.levels.append(outs)

    def free(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        if self.prompt_lookup is not None:
            self.prompt_lookup.free(request_id)
