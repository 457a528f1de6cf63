"""Paged attention vs a dense causal reference: mixed batches, shuffled blocks, GQA, sliding window, softcap."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ember.layers.attention import TorchAttentionBackend, build_attention_metadata
from ember.worker.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block

from attention_reference import random_trees, reference_attention

HQ, HK, D, BS = 4, 2, 16, 4


def _run(query_lens, seq_lens, window=None, softcap=None, seed=0, tree_width=None):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = 64
    kv_cache = allocate_kv_caches(1, num_blocks, BS, HK, D, torch.float32, "cpu")[0]
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables, full_k, full_v, qs = [], [], [], []
    for ql, sl in zip(query_lens, seq_lens):
        table = [free.pop() for _ in range(-(-sl // BS))]
        tables.append(table)
        k, v = torch.randn(sl, HK, D, generator=g), torch.randn(sl, HK, D, generator=g)
        for p in range(sl - ql):  # the cached context
            kv_cache[0, table[p // BS], p % BS] = k[p]
            kv_cache[1, table[p // BS], p % BS] = v[p]
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(ql, HQ, D, generator=g))
    md = build_attention_metadata(query_lens, seq_lens, tables, BS, "cpu")
    masks = [None] * len(query_lens)
    if tree_width is not None:  # draft trees on the short sequences, in the same batched call as decodes
        md.tree_mask, masks = random_trees(query_lens, seq_lens, tree_width, g, window)
    q = torch.cat(qs)
    k_new = torch.cat([k[-ql:] for k, ql in zip(full_k, query_lens)])
    v_new = torch.cat([v[-ql:] for v, ql in zip(full_v, query_lens)])
    scale = 1 / math.sqrt(D)
    out = TorchAttentionBackend().forward(q, k_new, v_new, kv_cache, md, scale=scale,
                                          sliding_window=window, logit_softcap=softcap)
    ref = torch.cat([reference_attention(qi, ki, vi, scale, window, softcap, m).float()
                     for qi, ki, vi, m in zip(qs, full_k, full_v, masks)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The new K/V landed at their slots.
    flat = kv_cache.view(2, -1, HK, D)
    torch.testing.assert_close(flat[0, md.slot_mapping], k_new)
    torch.testing.assert_close(flat[1, md.slot_mapping], v_new)


# One sequence prefilling from scratch, one chunk with cached context, several decodes (interleaved).
MIXED = ([9, 1, 5, 1, 1], [9, 7, 11, 14, 1])


@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (None, 2.0), (5, 1.5)])
def test_mixed_batch(window, softcap):
    _run(*MIXED, window=window, softcap=softcap)


@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (None, 2.0)])
def test_all_decode(window, softcap):
    _run([1] * 6, [1, 5, 8, 9, 13, 30], window=window, softcap=softcap, seed=1)


def test_prefill_only_and_context_chunks():
    _run([12, 6, 3], [12, 10, 19], seed=2)
    _run([12, 6, 3], [12, 10, 19], window=6, softcap=3.0, seed=2)


@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 2.0)])
def test_tree_masks_batched_beside_decodes_and_prefill(window, softcap):
    # trees of 2-6 new tokens, decodes, a long prefill chunk (causal) and one from scratch
    _run([4, 1, 9, 6, 1, 2, 12], [12, 5, 20, 30, 14, 9, 12], window=window, softcap=softcap, seed=3, tree_width=6)
    _run([3, 5], [8, 26], window=window, softcap=softcap, seed=4, tree_width=5)  # trees only


def test_metadata_builder():
    md = build_attention_metadata([3, 1], [5, 9], [[7, 2], [4, 8, 6]], 4, "cpu")
    # seq 0: positions 2,3,4 -> blocks 7,7,2; seq 1: position 8 -> block 6
    assert md.slot_mapping.tolist() == [30, 31, 8, 24]
    assert md.query_start_loc.tolist() == [0, 3, 4] and md.query_start_loc.dtype == torch.int32
    assert md.seq_lens.tolist() == [5, 9] and md.seq_lens.dtype == torch.int32
    assert md.block_tables.tolist() == [[7, 2, 0], [4, 8, 6]] and md.block_tables.dtype == torch.int32
    assert (md.max_query_len, md.max_seq_len, md.is_all_decode) == (3, 9, False)
    dec = build_attention_metadata([1, 1], [5, 9], [[7, 2], [4, 8, 6]], 4, "cpu")
    assert dec.slot_mapping.tolist() == [8, 24] and dec.is_all_decode


def test_kv_cache_allocation():
    caches = allocate_kv_caches(3, 10, 16, 2, 8, torch.bfloat16, "cpu")
    assert len(caches) == 3 and caches[0].shape == (2, 10, 16, 2, 8) and caches[0].dtype == torch.bfloat16
    assert kv_cache_bytes_per_block(3, 16, 2, 8, torch.bfloat16) == caches[0][:, :1].nbytes * 3
