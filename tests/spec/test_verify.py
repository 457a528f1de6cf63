"""Verification: greedy acceptance is argmax-exact; rejection sampling keeps the target distribution."""

import torch

from ember.layers.sampler import SamplingMetadata
from ember.spec.tree import build_tree_mask
from ember.spec.verify import verify_drafts


def _meta(rows, temperature, gen=None):
    return SamplingMetadata(temperatures=torch.full((rows,), temperature), top_ps=None, top_ks=None, min_ps=None,
                            presence_penalties=None, frequency_penalties=None, repetition_penalties=None,
                            output_token_counts=None, prompt_token_mask=None, banned_token_ids=None,
                            generators=[gen] * rows, num_logprobs=[None] * rows,
                            is_all_greedy=temperature == 0, is_all_random=temperature > 0)


def _onehot_logits(targets, vocab=8):
    logits = torch.full((len(targets), vocab), -5.0)
    logits[torch.arange(len(targets)), torch.tensor(targets)] = 5.0
    return logits


def test_greedy_chain_accepts_the_matching_prefix_plus_one():
    # drafts 3 4 9; the model wants 3 4 5 then (after 9) anything
    logits = _onehot_logits([3, 4, 5, 1])
    toks, outs = verify_drafts(logits, _meta(4, 0.0), [[3, 4, 9]], [None])
    assert toks == [[3, 4, 5]] and outs[0].accepted_nodes == [0, 1]
    toks, _ = verify_drafts(logits, _meta(4, 0.0), [[3, 4, 5]], [None])
    assert toks == [[3, 4, 5, 1]]  # all accepted + the bonus


def test_greedy_tree_descends_into_the_matching_branch():
    # root children: 7 (node 0), 3 (node 1); node 1's child 4 (node 2); rows: root, n0, n1, n2
    logits = _onehot_logits([3, 0, 4, 6])
    toks, outs = verify_drafts(logits, _meta(4, 0.0), [[7, 3, 4]], [[-1, -1, 1]])
    assert toks == [[3, 4, 6]] and outs[0].accepted_nodes == [1, 2]


def test_rejection_sampling_keeps_the_distribution():
    """Marginals of the first two emitted tokens under verification match the exact target, for a
    tree with two candidates at the root (one likely, one unlikely) and a chain below the first."""
    torch.manual_seed(0)
    vocab = 5
    p_root = torch.tensor([0.1, 0.5, 0.2, 0.15, 0.05])
    p_after1 = torch.tensor([0.3, 0.1, 0.1, 0.4, 0.1])  # after token 1 (node 0)
    p_after4 = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])  # after token 4 (node 1)
    p_after13 = torch.tensor([0.05, 0.05, 0.6, 0.2, 0.1])
    logits = torch.stack([p_root, p_after1, p_after4, p_after13]).log()
    drafts, parents = [1, 4, 3], [-1, -1, 0]  # nodes: 1 (root), 4 (root), 3 (after 1)
    gen = torch.Generator().manual_seed(1)
    num = 6000
    first = torch.zeros(vocab)
    second_after1 = torch.zeros(vocab)
    for _ in range(num):
        toks, _ = verify_drafts(logits, _meta(4, 1.0, gen), [drafts], [parents])
        t = toks[0]
        first[t[0]] += 1
        if t[0] == 1:
            second_after1[t[1]] += 1
    _assert_matches(first, p_root)
    _assert_matches(second_after1, p_after1)


def _assert_matches(counts, p):
    """Pearson chi-square against p; 4 degrees of freedom, threshold at p-value ~1e-4."""
    n = counts.sum()
    chi2 = (((counts - n * p) ** 2) / (n * p)).sum().item()
    assert chi2 < 23.5, (counts / n, p, chi2)


def test_tree_mask_is_ancestors_over_new_tokens():
    class Item:
        def __init__(self, n, d):
            self.num_new_tokens, self.num_draft_tokens = n, d

    # a tree (root + 3 drafts), a plain decode, a prompt-lookup chain (root + 2), a prefill chunk of 9
    mask = build_tree_mask([Item(4, 3), Item(1, 0), Item(3, 2), Item(9, 0)], [[-1, -1, 0], None, None, None])
    assert mask.shape == (4 + 1 + 3 + 9, 4)  # as wide as the longest drafting query
    assert mask[0].tolist() == [True, False, False, False]  # the root sees itself (and its context)
    assert mask[1].tolist() == [True, True, False, False]  # node 0: root + itself
    assert mask[2].tolist() == [True, False, True, False]  # node 1: blind to its sibling node 0
    assert mask[3].tolist() == [True, True, False, True]  # node 2: root + node 0 + itself
    assert mask[4].tolist() == [True, False, False, False]  # the decode
    assert mask[5:8].tolist() == [[True, False, False, False], [True, True, False, False], [True, True, True, False]]
    assert not mask[8:].any()  # longer than the mask: causal, rows unused
    assert build_tree_mask([Item(1, 0), Item(5, 0)], [None, None]) is None  # no drafts: plain causal step
