"""Batch-invariant paged attention (`ember.deterministic: true`): a token's output does not depend on which
other tokens share its step, how its prompt was chunked, or which of its blocks came from the prefix cache.

The fast paths pick kernels by shape (a 1-token decode, a causal prefill chunk, a chunk after cached context)
and each kernel reduces over the keys in its own order, so the same token can round differently in bf16
depending on its company. Here every token attends on its own, always through the same calls:

- its keys are its sequence's KV, padded with masked positions to a multiple of KEY_CHUNK;
- scores: one [G, D] x [D, KEY_CHUNK] matmul per (KV head, token, key chunk) -- the same shape every time,
  whatever the batch (a batched matmul computes each item alone);
- softmax over the padded row (one row per query head, reduced the same way whatever its padding: masked keys
  add exact zeros);
- the weighted sum of V: one [G, KEY_CHUNK] x [KEY_CHUNK, D] matmul per chunk, then the chunks added in key
  order in float32.
The cost: each token gets its own copy of its sequence's K/V (in tiles of QUERY_TILE tokens), so prefill
attention does T x S work in copies as well as in matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.layers.batched_attention import dequant_kv, gather_kv

KEY_CHUNK = 64  # keys per reduction chunk (a multiple of every vector width, so no row has a ragged tail)
QUERY_TILE = 64  # tokens attended per batched call (bounds the per-token K/V copies)


def _plan(md, q: torch.Tensor, window: int | None, kv_len: int):
    """Per step and window: each token's sequence index [T] and its additive mask [T, S_pad] (0 or -inf)."""
    key = ("invariant", window)
    plan = md.derived.get(key)
    if plan is not None:
        return plan
    dev = q.device
    q_lens = torch.tensor(md.query_lens_list, dtype=torch.int64)
    s_lens = torch.tensor(md.seq_lens_list, dtype=torch.int64)
    num_tokens = int(q_lens.sum())
    seq_idx = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens, output_size=num_tokens)  # [T]
    starts = torch.cumsum(q_lens, 0) - q_lens
    pos = torch.arange(num_tokens) - starts[seq_idx] + (s_lens - q_lens)[seq_idx]  # [T]
    kv_pos = torch.arange(kv_len)  # [S_pad]
    ctx = (s_lens - q_lens)[seq_idx]  # [T] cached context of each token's sequence
    visible = kv_pos[None, :] <= pos[:, None]  # [T, S_pad] causal
    if md.tree_mask is not None:  # speculative rows (sequences with at most M new tokens): the tree's mask
        tm = md.tree_mask.cpu()
        m = tm.shape[1]
        rel = kv_pos[None, :] - ctx[:, None]  # [T, S_pad] index among the sequence's new tokens
        is_tree = q_lens[seq_idx] <= m  # [T]
        is_new = (rel >= 0) & (rel < q_lens[seq_idx][:, None])
        tree_vis = (kv_pos[None, :] < ctx[:, None]) | (is_new & tm.gather(1, rel.clamp(0, m - 1)))
        visible = torch.where(is_tree[:, None], tree_vis, visible)
        pos = torch.where(is_tree, ctx + tm.sum(-1) - 1, pos)  # a tree node sits one past its deepest ancestor
    if window is not None:
        visible &= kv_pos[None, :] > pos[:, None] - window
    bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, float("-inf"))
    plan = md.derived[key] = (seq_idx.to(dev), bias.to(dev))
    return plan


def invariant_attention(q: torch.Tensor, kv_cache: torch.Tensor, md, *, scale: float, window: int | None,
                        softcap: float | None, kv_scale: torch.Tensor | None) -> torch.Tensor:
    """q [T, Hq, D] against the paged cache (this step's K/V already written) -> [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    kv_len = -(-md.max_seq_len // KEY_CHUNK) * KEY_CHUNK  # S_pad
    num_chunks = kv_len // KEY_CHUNK
    seq_idx, bias = _plan(md, q, window, kv_len)
    nblk = -(-md.max_seq_len // block_size)
    kv = gather_kv(kv_cache, md.block_tables[:, :nblk])  # [2, Hk, B, nblk * block_size, D]
    kv = dequant_kv(kv, kv_scale, q.dtype)
    have = kv.shape[3]
    kv = F.pad(kv, (0, 0, 0, kv_len - have)) if have < kv_len else kv[:, :, :, :kv_len]  # [2, Hk, B, S_pad, D]
    out = torch.empty_like(q)
    for t0 in range(0, num_tokens, QUERY_TILE):
        t1 = min(t0 + QUERY_TILE, num_tokens)
        n = t1 - t0
        sel = seq_idx[t0:t1]
        k = kv[0].index_select(1, sel).view(num_kv_heads, n, num_chunks, KEY_CHUNK, head_dim)  # [Hk, n, nC, C, D]
        v = kv[1].index_select(1, sel).view(num_kv_heads, n, num_chunks, KEY_CHUNK, head_dim)
        qg = q[t0:t1].reshape(n, num_kv_heads, group, head_dim).transpose(0, 1).unsqueeze(2)  # [Hk, n, 1, G, D]
        qg = qg.expand(num_kv_heads, n, num_chunks, group, head_dim)
        if softcap is None:
            scores = torch.matmul(qg * scale, k.transpose(-1, -2))  # [Hk, n, nC, G, C]
        else:
            scores = torch.tanh(torch.matmul(qg, k.transpose(-1, -2)) * (scale / softcap)) * softcap
        scores = scores.transpose(2, 3).reshape(num_kv_heads, n, group, kv_len)  # [Hk, n, G, S_pad]
        scores = scores.float() + bias[t0:t1].view(1, n, 1, kv_len)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        probs = probs.view(num_kv_heads, n, group, num_chunks, KEY_CHUNK).transpose(2, 3)  # [Hk, n, nC, G, C]
        partial = torch.matmul(probs, v)  # [Hk, n, nC, G, D]
        summed = partial.float().cumsum(2)[:, :, -1]  # [Hk, n, G, D]: the chunks added in key order
        out[t0:t1] = summed.to(q.dtype).transpose(0, 1).reshape(n, num_heads, head_dim)
    return out
