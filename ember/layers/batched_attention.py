"""Batched paged attention over short query runs: decodes and speculative (chain or tree) verification.

Every sequence in the group has a few new tokens (Q at most); their queries are padded to Q per sequence
and attended to the sequences' gathered K/V in one SDPA call: one gather and one fused attention per layer
for the whole group, no loop over sequences. Which K/V positions a query sees is one additive
bias per step (`BatchPlan.bias`), built once and shared by every layer: the sequence's cached context,
plus its new tokens as the step's tree mask allows (causal without one), within the sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.layers import cpu_kernels


def is_head_major(kv_cache: torch.Tensor) -> bool:
    """True when the cache's memory is laid out head-major, `[2, Hk, num_blocks, block_size, D]` (the CPU
    layout: a gather through block tables is then one contiguous copy per block and head)."""
    return kv_cache.stride(3) > kv_cache.stride(1)


def gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """K/V of the blocks in `block_tables` [B, nblk] -> [2, Hk, B, nblk * block_size, D], ready for
    batched matmuls over (Hk, B) without a transposing copy when the cache is head-major."""
    num_seqs, nblk = block_tables.shape
    if is_head_major(kv_cache):
        phys = kv_cache.permute(0, 3, 1, 2, 4)  # [2, Hk, num_blocks, block_size, D], contiguous
        _, hk, num_blocks, bs, d = phys.shape
        rows = phys.reshape(2, hk, num_blocks, bs * d).index_select(2, block_tables.reshape(-1).long())
        return rows.view(2, hk, num_seqs, nblk * bs, d)
    return kv_cache[:, block_tables].flatten(2, 3).permute(0, 3, 1, 2, 4)  # [2, Hk, B, S, D], strided


def dequant_kv(kv: torch.Tensor, kv_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Gathered cache values [2, ...] in the cache dtype -> true K/V in `dtype`."""
    if kv_scale is None:
        return kv
    return kv.to(dtype) * kv_scale.to(dtype).view(2, *([1] * (kv.dim() - 1)))


@dataclass
class BatchPlan:
    """One step's layout of a group of short-query sequences, shared by every layer."""

    block_tables: torch.Tensor  # [B, nblk] int32: the group's blocks, cut to its longest sequence
    max_len: int  # longest KV length in the group
    num_queries: int  # Q: query slots per sequence (its new tokens, padded)
    query_index: torch.Tensor | None  # [B * Q] int64 flat token of each slot (padding: the sequence's first); None: identity
    out_slots: torch.Tensor | None  # [N] int64 slots holding real tokens; None: every slot, in flat-token order
    out_tokens: torch.Tensor | None  # [N] int64 the flat tokens those slots answer
    bias: torch.Tensor | None  # [1, B, Q, 1, S] additive mask (0 / -inf); None: every position up to max_len
    seq_lens: torch.Tensor | None = None  # [B] int32 KV length of each sequence (the C++ decode kernel reads it)
    window: int | None = None  # sliding window, as the bias applies it
    uses_kernel: bool | None = None  # whether calls go to the C++ kernels: decided at the first layer
    visible: torch.Tensor | None = None  # [B, Q, S] uint8, the bias as ember_cpu::masked_attention reads it


def plan_batch(seq_ids: list[int], starts: list[int], query_lens: list[int], seq_lens: list[int],
               block_tables: torch.Tensor, block_size: int, tree_mask: torch.Tensor | None,
               window: int | None, dtype: torch.dtype, device) -> BatchPlan:
    """Plan sequences `seq_ids` (indices into the step's per-sequence lists; `starts` [B + 1] are flat token
    offsets) as one batched attention. `tree_mask` [T, M] (ember.layers.attention.AttentionMetadata) or
    None: causal."""
    q_lens = [query_lens[i] for i in seq_ids]
    s_lens = [seq_lens[i] for i in seq_ids]
    nq, max_len = max(q_lens), max(s_lens)
    nblk = -(-max_len // block_size)
    sel = torch.tensor(seq_ids, dtype=torch.int64)
    bt = block_tables.index_select(0, sel.to(block_tables.device))[:, :nblk]  # [B, nblk]
    is_identity = nq == 1 and seq_ids == list(range(len(seq_ids))) and len(seq_ids) == len(query_lens)
    if nq == 1 and window is None and all(s == max_len for s in s_lens):
        bias = None  # equal lengths, one query each (batch 1 included): slicing off block padding is the mask
    else:
        bias = _bias(q_lens, s_lens, [starts[i] for i in seq_ids], nq, nblk * block_size, tree_mask, window, dtype)
        bias = bias.to(device)
    lens = torch.tensor(s_lens, dtype=torch.int32, device=device)
    if is_identity:
        return BatchPlan(bt, max_len, 1, None, None, None, bias, lens, window)
    slot_tok, out_slots, out_tokens = [], [], []
    for b, (i, n) in enumerate(zip(seq_ids, q_lens)):
        s = starts[i]
        slot_tok.extend(range(s, s + n))
        slot_tok.extend([s] * (nq - n))
        out_slots.extend(range(b * nq, b * nq + n))
        out_tokens.extend(range(s, s + n))

    def idx(x):
        return torch.tensor(x, dtype=torch.int64, device=device)

    return BatchPlan(bt, max_len, nq, idx(slot_tok), idx(out_slots), idx(out_tokens), bias, lens, window)


def _bias(q_lens, s_lens, starts, nq, span, tree_mask, window, dtype) -> torch.Tensor:
    """[1, B, Q, 1, S] 0 where query slot (b, i) may see KV position s, -inf elsewhere."""
    q_len = torch.tensor(q_lens, dtype=torch.int64)  # [B]
    s_len = torch.tensor(s_lens, dtype=torch.int64)
    ctx = s_len - q_len  # [B] cached context
    kv_pos = torch.arange(span)  # [S]
    i = torch.arange(nq)  # [Q]
    rel = kv_pos[None, :] - ctx[:, None]  # [B, S] index among the new tokens
    is_new = (rel >= 0) & (rel < q_len[:, None])  # [B, S]
    if tree_mask is None or nq == 1:
        new_vis = rel[:, None, :] <= i[None, :, None]  # [B, Q, S] causal
        depth = i.expand(len(q_lens), nq)  # [B, Q]
    else:
        tm = tree_mask.cpu()
        m = tm.shape[1]
        rows = torch.tensor([s + min(k, n - 1) for s, n in zip(starts, q_lens) for k in range(nq)])
        tm = tm.index_select(0, rows).view(len(q_lens), nq, m)  # [B, Q, M]
        new_vis = tm.gather(2, rel.clamp(0, m - 1).unsqueeze(1).expand(-1, nq, -1))  # [B, Q, S]
        depth = tm.sum(-1) - 1  # [B, Q] logical offset: a tree node sits one past its deepest ancestor
    visible = (new_vis & is_new[:, None, :]) | (kv_pos < ctx[:, None])[:, None, :]  # [B, Q, S]
    if window is not None:
        q_pos = ctx[:, None] + depth  # [B, Q] logical position of each query
        visible &= kv_pos[None, None, :] > (q_pos - window)[:, :, None]
    is_pad = i[None, :] >= q_len[:, None]  # [B, Q]
    visible |= is_pad[:, :, None] & (kv_pos < s_len[:, None])[:, None, :]  # padding slots: anything finite
    bias = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    return bias[None, :, :, None, :]  # [1, B, Q, 1, S]


def attend_batch(q: torch.Tensor, kv_cache: torch.Tensor, plan: BatchPlan, scale: float,
                 softcap: float | None, kv_scale: torch.Tensor | None, *, fused: bool = True) -> torch.Tensor:
    """q [T, Hq, D] (the step's flat queries) -> [B * Q, Hq, D], one row per query slot of the plan.

    On a CPU with ember's kernels, straight from the paged cache (ember/csrc/attention_cpu.cpp): one query per
    sequence (decodes) `ember_cpu::decode_attention`; several (speculative verification)
    `ember_cpu::masked_attention` with the plan's mask, every K/V row read once for all of a sequence's slots
    (float32 lookahead on code, 128 tokens, same process: 3.68-3.98 s vs 3.76-4.14 s with the gather + SDPA).
    Otherwise one SDPA call over the gathered K/V (GQA
    without a K/V expand, the plan's bias as its additive mask): on CPU one fused kernel, about half the time
    of the matmul / softmax / matmul chain in bf16 at decode sizes (`ember bench attention`). Soft-capped
    scores (Gemma 2) need the explicit chain (`fused=False`: the chain for any call, the benchmark's baseline).
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[3]
    num_seqs, nq = plan.block_tables.shape[0], plan.num_queries
    qb = q if plan.query_index is None else q.index_select(0, plan.query_index)  # [B * Q, Hq, D]
    if fused and softcap is None and kv_scale is None:
        if plan.uses_kernel is None:  # the same for every layer of the step: decided once
            plan.uses_kernel = has_attention_kernel(qb, kv_cache, plan.block_tables, plan.seq_lens)
        if plan.uses_kernel and nq == 1:
            return torch.ops.ember_cpu.decode_attention(qb.contiguous(), kv_cache, plan.block_tables, plan.seq_lens,
                                                        scale, plan.window or 0)
        if plan.uses_kernel:  # verification (a chain or a tree per sequence): the plan's mask, read in C++
            if plan.visible is None:
                plan.visible = (plan.bias[0, :, :, 0, :] == 0).to(torch.uint8).contiguous()  # [B, Q, S]
            return torch.ops.ember_cpu.masked_attention(qb.contiguous(), kv_cache, plan.block_tables, plan.seq_lens,
                                                        plan.visible, scale)
    kv = gather_kv(kv_cache, plan.block_tables)  # [2, Hk, B, S, D]
    if plan.bias is None:
        kv = kv[..., :plan.max_len, :]  # a view: every sequence is exactly max_len long
    kv = dequant_kv(kv, kv_scale, q.dtype)
    if softcap is None and fused:
        qs = qb.view(num_seqs, nq, num_heads, head_dim).transpose(1, 2)  # [B, Hq, Q, D]
        mask = None if plan.bias is None else plan.bias[0].transpose(1, 2)  # [B, 1, Q, S]
        out = F.scaled_dot_product_attention(qs, kv[0].transpose(0, 1), kv[1].transpose(0, 1), attn_mask=mask,
                                             scale=scale, enable_gqa=num_heads != num_kv_heads)  # [B, Hq, Q, D]
        return out.transpose(1, 2).reshape(num_seqs * nq, num_heads, head_dim)
    return _attend_matmuls(qb, kv, plan, scale, softcap, num_seqs, nq)


def has_attention_kernel(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor | None) -> bool:
    """Whether ember's C++ attention (`ember_cpu::decode_attention`, and `masked_attention` for several query
    slots per sequence) takes q [B * Q, Hq, D] over this cache, block tables [B, nblk] and KV lengths [B]
    (CPU, bf16/fp32, the shapes and index dtypes it handles)."""
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float32) or kv_cache.dtype != q.dtype:
        return False
    if q.shape[-1] % 16 or q.shape[-1] > 256 or q.shape[1] // kv_cache.shape[3] > 8:
        return False
    if seq_lens is None or seq_lens.dtype != torch.int32 or block_tables.dtype != torch.int32 \
            or block_tables.stride(-1) != 1:
        return False
    return cpu_kernels.load()


def _attend_matmuls(qb, kv, plan: BatchPlan, scale: float, softcap: float | None, num_seqs: int,
                    nq: int) -> torch.Tensor:
    """Attention as grouped matmuls, optionally soft-capped (the Hq / Hk query heads of a KV head together, no K/V
    expand). qb [B * Q, Hq, D], kv [2, Hk, B, S, D] -> [B * Q, Hq, D]."""
    num_heads, head_dim = qb.shape[1], qb.shape[2]
    num_kv_heads = kv.shape[1]
    g = num_heads // num_kv_heads
    if nq == 1:
        qg = qb.view(num_seqs, num_kv_heads, g, head_dim).transpose(0, 1)  # [Hk, B, G, D]
    else:
        qg = qb.view(num_seqs, nq, num_kv_heads, g, head_dim).permute(2, 0, 1, 3, 4)  # [Hk, B, Q, G, D]
        qg = qg.reshape(num_kv_heads, num_seqs, nq * g, head_dim)  # [Hk, B, Q*G, D]
    if softcap is None:
        scores = torch.matmul(qg * scale, kv[0].transpose(-1, -2))  # [Hk, B, Q*G, S]
    else:
        scores = torch.tanh(torch.matmul(qg, kv[0].transpose(-1, -2)) * (scale / softcap)) * softcap
    if plan.bias is not None:
        s = scores.shape[-1]
        scores = (scores.view(num_kv_heads, num_seqs, nq, g, s) + plan.bias).view(num_kv_heads, num_seqs, nq * g, s)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, kv[1])  # [Hk, B, Q*G, D]
    if nq == 1:
        return out.transpose(0, 1).reshape(num_seqs, num_heads, head_dim)
    out = out.view(num_kv_heads, num_seqs, nq, g, head_dim).permute(1, 2, 0, 3, 4)  # [B, Q, Hk, G, D]
    return out.reshape(num_seqs * nq, num_heads, head_dim)
