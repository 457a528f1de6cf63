"""Proposers and draft trees without a model: suffix index, n-gram pool, lookahead tree shape, masks."""

import torch

from ember.sampling_params import SamplingParams
from ember.spec.lookahead import LookaheadProposer, NgramPool, TreeBuilder
from ember.spec.prompt_lookup import PromptLookupProposer, SuffixIndex
from ember.spec.tree import chain_parents, depths, rope_positions


class _Req:
    def __init__(self, tokens, rid="r", params=None, num_prompt=None):
        self.request_id = rid
        self.all_token_ids = list(tokens)
        self.prompt_token_ids = list(tokens[:num_prompt or len(tokens)])
        self.sampling_params = params or SamplingParams(temperature=0)


def test_suffix_index_longest_latest_match_and_incremental():
    idx = SuffixIndex(max_match=4)
    toks = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # suffix (2, 3): latest earlier end is position 6, followed by 7, 8, 5 ...
    assert idx.lookup(toks, 3) == [7, 8, 5]
    toks += [7]  # suffix (2, 3, 7) matches at end 7 -> 8, 5, 2 (longest match wins over (7,))
    assert idx.lookup(toks, 3) == [8, 5, 2]
    assert idx.num_indexed == len(toks) - 1  # fed incrementally, never rescanned
    assert SuffixIndex(4).lookup([4, 5, 6], 3) == []


def test_suffix_index_overlapping_copy_for_short_periods():
    toks = [7, 1, 2, 1, 2, 1, 2]
    assert SuffixIndex(3).lookup(toks, 6) == [1, 2, 1, 2, 1, 2]  # period 2 continued past the end


def test_prompt_lookup_adapts_its_length():
    pl = PromptLookupProposer(max_draft_len=16, initial_len=4)
    req = _Req([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 1, 2])
    d = pl.propose(req, 100)
    assert d.token_ids == [3, 4, 5, 6] and d.parents is None
    pl.on_verified(req, d, 4, [0, 1, 2, 3], [])
    assert len(pl.propose(req, 100)) == 8  # all accepted: reach further
    pl.on_verified(req, d, 8, [0], [])
    assert len(pl.propose(req, 100)) == 2  # went wrong early: shrink
    assert len(pl.propose(req, 1)) == 1  # never above the room given


def test_ngram_pool_keeps_latest():
    pool = NgramPool(cap=2)
    for ng in [(1, 2, 3), (1, 4, 5), (1, 2, 3), (1, 6, 7)]:
        pool.add(ng)
    assert pool.candidates(1, 5) == [(6, 7), (2, 3)]


def test_tree_builder_merges_shared_prefixes():
    tb = TreeBuilder()
    tb.add_chain([5, 6, 7], 10)
    tb.add_chain([5, 6, 8], 10)
    tb.add_chain([9], 10)
    d = tb.draft()
    assert d.token_ids == [5, 6, 7, 8, 9] and d.parents == [-1, 0, 1, 1, -1]
    assert depths(d.parents) == [0, 1, 2, 2, 0]
    assert tb.add_chain([1, 2, 3], 6) == [5]  # capped at max_nodes


def test_lookahead_tree_window_and_pool():
    w, n, g = 3, 3, 2
    la = LookaheadProposer(w, n, g)
    prompt = [10, 11, 12, 13, 10, 11, 14, 15]
    req = _Req(prompt + [10])
    d = la.propose(req, 100)
    # verification: n-grams keyed by 10 from the prompt ((11, 14) latest), then the 1-level window
    assert d.token_ids[:3] == [11, 14, 12] and d.parents[:3] == [-1, 0, 0]  # a trie: 11 shared
    win = d.parents[3:]
    assert win == [-1, 3, 4]  # level 0 is a causal chain
    # window outputs become level 1; n-grams are harvested once N-1 levels exist
    argmax = [0] * (1 + len(d))
    for c in range(w):
        argmax[1 + 3 + c] = 20 + c
    la.on_verified(req, d, len(d), [], argmax)
    d2 = la.propose(req, 100)
    lv = d2.parents[3:]
    # level 1 token (1, c) hangs under (0, c): it sees level 0's columns <= c
    assert lv == [-1, 3, 4, 3, 4, 5]
    assert d2.token_ids[6:] == [20, 21, 22]
    assert rope_positions(0, 1 + len(d2), len(d2), d2.parents)[1 + 3:] == [1, 2, 3, 2, 3, 4]


def test_rope_positions_chain():
    assert rope_positions(10, 4, 3, None) == [10, 11, 12, 13]
    assert rope_positions(10, 4, 3, chain_parents(3)) == [10, 11, 12, 13]


def test_suffix_index_continuations_longest_match_first():
    toks = [1, 2, 3, 4, 9, 3, 5, 6, 2, 3]
    # suffix (2, 3) last ended at 2 (-> 4, 9); the shorter (3,) last ended at 5 (-> 5, 6)
    assert SuffixIndex(4).continuations(toks, 2, 3) == [[4, 9], [5, 6]]
    assert SuffixIndex(4).continuations(toks, 2, 1) == [[4, 9]]


def test_lookahead_verifies_the_longest_context_match_before_recent_ngrams():
    la = LookaheadProposer(1, 3, 2)
    # after "7 8" came "1 2" long ago; "8" was most recently followed by "5 6"
    req = _Req([7, 8, 1, 2, 0, 3, 8, 5, 6, 4, 7, 8])
    d = la.propose(req, 100)
    assert d.token_ids[:4] == [1, 2, 5, 6] and d.parents[:4] == [-1, 0, -1, 2]


def test_speculator_shares_the_step_budget_evenly():
    from ember.spec.proposer import Draft, Proposer
    from ember.spec.speculator import Speculator

    class Long(Proposer):
        def propose(self, req, max_len):
            return Draft([5] * max_len)

    class R(_Req):
        num_output_tokens, max_tokens = 0, 100

        @property
        def num_computed_tokens(self):
            return len(self.all_token_ids) - 1

        num_tokens = property(lambda self: len(self.all_token_ids))

    reqs = [R([1, 2, 3], rid=str(i)) for i in range(3)]
    for r in reqs:
        r.matcher = None
    Speculator(Long(), max_draft_len=16, max_spec_tokens=3 + 10).propose(reqs)
    assert [len(r.spec_token_ids) for r in reqs] == [3, 3, 4]  # 10 drafts over 3 requests, none starved
