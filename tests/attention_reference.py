"""Dense float64 attention: the independent reference the paged-attention tests (torch backend and Triton
kernel) compare against."""

from __future__ import annotations

import torch


def reference_attention(q, k, v, scale, window=None, softcap=None, mask=None) -> torch.Tensor:
    """q [L, Hq, D] at the last L positions of k/v [S, Hk, D] -> [L, Hq, D] in float64. Causal (and within
    `window` when set) unless an explicit boolean `mask` [L, S] is given."""
    hq, hk = q.shape[1], k.shape[1]
    L, S = q.shape[0], k.shape[0]
    k = k.double().repeat_interleave(hq // hk, dim=1)
    v = v.double().repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("lhd,shd->hls", q.double(), k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        qpos = torch.arange(S - L, S).unsqueeze(1)
        kpos = torch.arange(S)
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v)


def random_trees(query_lens, seq_lens, width, gen, window=None):
    """Random draft trees for the sequences with at most `width` new tokens: the first new token is the
    root (the last real token), each later one hangs under a random earlier one. Returns the step's
    `tree_mask` [T, width] bool and, per sequence, the dense reference mask [L, S] over its whole KV (the
    context, within `window` of each query's logical position, plus its ancestors and itself)."""
    rows, dense = [], []
    for ql, sl in zip(query_lens, seq_lens):
        ctx = sl - ql
        if ql > width:  # a prefill chunk: causal, its rows ignored
            rows.append(torch.zeros(ql, width, dtype=torch.bool))
            qpos, kpos = torch.arange(ctx, sl).unsqueeze(1), torch.arange(sl)
            m = kpos <= qpos
            dense.append(m & (kpos > qpos - window) if window is not None else m)
            continue
        parent = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, ql)]
        anc, depth = [], []
        for i, p in enumerate(parent):
            anc.append((anc[p] if p >= 0 else set()) | {i})
            depth.append(depth[p] + 1 if p >= 0 else 0)
        r = torch.zeros(ql, width, dtype=torch.bool)
        m = torch.zeros(ql, sl, dtype=torch.bool)
        for i in range(ql):
            r[i, sorted(anc[i])] = True
            lo = ctx + depth[i] - window + 1 if window is not None else 0
            m[i, max(0, lo):ctx] = True
            m[i, [ctx + j for j in anc[i]]] = True
        rows.append(r)
        dense.append(m)
    return torch.cat(rows), dense
