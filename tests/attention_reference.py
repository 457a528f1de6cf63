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
