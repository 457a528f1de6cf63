"""Deterministic attention (ember.layers.invariant_attention): right against the dense float64 reference, and
bit-identical in bf16 for one sequence's tokens whether they run alone, chunked, after cached context, or as a
decode among longer sequences (the fast paths differ in the last bits there)."""

from __future__ import annotations

import math

import pytest
import torch

from ember.layers.attention import TorchAttentionBackend, build_attention_metadata
from ember.worker.kv_cache import allocate_kv_caches

from attention_reference import reference_attention

HQ, HK, D, BS = 6, 2, 64, 16
SCALE = 1 / math.sqrt(D)


class Seqs:
    """Random K/V/q per sequence and a paged cache whose blocks are handed out in scrambled order."""

    def __init__(self, lens, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.cache = allocate_kv_caches(1, 96, BS, HK, D, dtype, "cpu")[0]
        free = torch.randperm(95, generator=g).add(1).tolist()
        self.k = [torch.randn(n, HK, D, generator=g).to(dtype) for n in lens]
        self.v = [torch.randn(n, HK, D, generator=g).to(dtype) for n in lens]
        self.q = [torch.randn(n, HQ, D, generator=g).to(dtype) for n in lens]
        self.tables = [[free.pop() for _ in range(-(-n // BS))] for n in lens]

    def step(self, chunks, window=None, softcap=None):
        """chunks: (sequence, first position, end position) per scheduled sequence -> output rows per chunk."""
        md = build_attention_metadata([e - s for _, s, e in chunks], [e for _, _, e in chunks],
                                      [self.tables[i] for i, _, _ in chunks], BS, "cpu", is_deterministic=True)
        cat = lambda xs: torch.cat([xs[i][s:e] for i, s, e in chunks])  # noqa: E731
        out = TorchAttentionBackend().forward(cat(self.q), cat(self.k), cat(self.v), self.cache, md, scale=SCALE,
                                              sliding_window=window, logit_softcap=softcap)
        return list(out.split([e - s for _, s, e in chunks]))


@pytest.mark.parametrize("window,softcap", [(None, None), (24, None), (None, 30.0)])
def test_matches_reference(window, softcap):
    seqs = Seqs([40, 70, 9, 130], torch.float32)
    first = seqs.step([(0, 0, 30), (1, 0, 70), (2, 0, 9), (3, 0, 100)], window, softcap)  # prefills
    later = seqs.step([(0, 30, 40), (3, 100, 130)], window, softcap)  # chunks after cached context
    decode = seqs.step([(0, 39, 40), (3, 129, 130)], window, softcap)  # (re)computed as decodes
    for i, s, e, out in [(0, 0, 30, first[0]), (1, 0, 70, first[1]), (2, 0, 9, first[2]), (3, 0, 100, first[3]),
                         (0, 30, 40, later[0]), (3, 100, 130, later[1]), (0, 39, 40, decode[0]),
                         (3, 129, 130, decode[1])]:
        ref = reference_attention(seqs.q[i][s:e], seqs.k[i][:e], seqs.v[i][:e], SCALE, window, softcap)
        torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=2e-5)


def test_bf16_rows_do_not_depend_on_the_batch():
    seqs = Seqs([50, 200, 3, 90], torch.bfloat16)
    alone = seqs.step([(0, 0, 50)])[0]  # the whole prompt in one chunk, alone
    # chunked prefill beside longer and shorter sequences, then the tail after cached blocks, then a decode
    part1 = seqs.step([(1, 0, 150), (0, 0, 20), (2, 0, 3), (3, 0, 90)])[1]
    part2 = seqs.step([(0, 20, 49), (1, 150, 200)])[0]
    last = seqs.step([(3, 89, 90), (0, 49, 50), (1, 199, 200)])[1]
    assert torch.equal(torch.cat([part1, part2, last]), alone)
