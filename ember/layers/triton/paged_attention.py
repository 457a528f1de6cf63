"""Paged attention in Triton for CUDA: one kernel for decode, chunked-prefill and mixed batches.

Reads K/V through `block_tables` from the cache layout `[2, num_blocks, block_size, num_kv_heads, head_dim]`
(ember.worker.kv_cache). Each program owns one tile of a sequence's new query tokens times the query heads
sharing one KV head (GQA rows), and streams that sequence's KV positions in `BLOCK_N` tiles with an online
softmax in fp32 (flash-attention style). The query tiles of the whole flat batch form grid axis 0; a program
finds its sequence by binary search over `query_start_loc`, so the launch needs no per-step host work beyond
the token count and is safe to capture in a CUDA graph. When few programs would cover a long context
(decode at small batch) the KV range is split over grid axis 2 (flash-decoding) and the partial results are
merged with their log-sum-exps.

Masks: causal (query token at position p sees KV positions <= p), optional sliding window (> p - window),
or, when `tree_mask` [T, M] is given (speculative verification), that mask over each short sequence's
new tokens (its cached context stays visible). Optional
logit softcap (Gemma 2) and a quantized (fp8) cache with per-layer K/V scales.

The same kernel runs on CPU tensors under the Triton interpreter, which is how the tests check it without a
GPU. Triton 3.9 decides at decoration time (`triton.jit`, including its own `tl.sum`/`tl.max` at `import
triton`) whether to interpret, from TRITON_INTERPRET=1: it must be set before triton is first imported
(tests/kernels does that); nothing in ember reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, IN_FP32: tl.constexpr):
    """a @ b accumulated in fp32: tensor cores for 16-bit inputs, exact fp32 products when IEEE."""
    if IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [T, Hq, D] (NUM_SPLITS == 1) or unused
    part_out_ptr,  # [T, Hq, NUM_SPLITS, D] float32 partial outputs (NUM_SPLITS > 1)
    part_lse_ptr,  # [T, Hq, NUM_SPLITS] float32 partial log2-sum-exp (NUM_SPLITS > 1)
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hk, D]
    v_cache_ptr,  # [num_blocks, block_size, Hk, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32: KV length after this step
    query_start_loc_ptr,  # [B + 1] int32
    mask_ptr,  # [T, mask_width] uint8 tree mask over each sequence's new tokens (HAS_MASK)
    qpos_ptr,  # [T] int32 logical position of each token under the tree mask (HAS_MASK and HAS_WINDOW)
    kv_scale_ptr,  # [2] float32 (HAS_KV_SCALE)
    scale,  # softmax scale
    softcap,  # logit softcap (HAS_SOFTCAP)
    window,  # sliding window (HAS_WINDOW)
    num_seqs,
    num_q_heads,
    block_size,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_mask,
    mask_width,  # sequences with more new tokens than this are causal
    NUM_Q_PER_KV: tl.constexpr,  # Hq // Hk
    G_PAD: tl.constexpr,  # NUM_Q_PER_KV rounded up to a power of two
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q * G_PAD
    BLOCK_N: tl.constexpr,  # KV positions per inner step
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KV_SCALE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IEEE_DOT: tl.constexpr,  # fp32 inputs: no tf32 truncation
    DOT_IN_FP32: tl.constexpr,  # the interpreter's tl.dot is wrong for bf16 (triton 3.9): upcast there
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Sequence of this query tile: sequence i owns tiles [qsl[i] // BLOCK_Q + i, ...).
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile_q0 = (q_block - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first token of the tile, within the sequence
    if tile_q0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    tok = tile_q0 + offs_m // G_PAD  # [BLOCK_M] token within the sequence's new tokens
    head_in_group = offs_m % G_PAD
    head = kv_head * NUM_Q_PER_KV + head_in_group  # [BLOCK_M] query head
    row_valid = (tok < q_len) & (head_in_group < NUM_Q_PER_KV)
    q_pos = ctx_len + tok  # [BLOCK_M] absolute position of each row's token
    flat_tok = q_start + tok  # [BLOCK_M] row in the flat batch
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM

    q = tl.load(q_ptr + flat_tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]

    # KV positions this tile can see. A tree node's ancestors come before it, so the causal bound holds
    # under a tree mask too; its logical position (the window's reference) is at most its slot position.
    kv_hi = tl.minimum(seq_len, ctx_len + tl.minimum(tile_q0 + BLOCK_Q, q_len))
    kv_lo = 0
    if HAS_MASK:
        is_tree = q_len <= mask_width
        tree_width = tl.where(is_tree, mask_width, 0)  # mask columns this sequence reads (none: causal)
    if HAS_WINDOW:
        first = tile_q0
        if HAS_MASK:
            first = tl.where(is_tree, 0, tile_q0)
        kv_lo = tl.maximum(0, ctx_len + first - window + 1)
    win_pos = q_pos
    if HAS_MASK and HAS_WINDOW:
        win_pos = tl.load(qpos_ptr + flat_tok, mask=row_valid, other=0)
    tile_lo = kv_lo // BLOCK_N
    tile_hi = (kv_hi + BLOCK_N - 1) // BLOCK_N
    tiles_per_split = (tile_hi - tile_lo + NUM_SPLITS - 1) // NUM_SPLITS
    t0 = tile_lo + split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tile_hi)

    if HAS_KV_SCALE:
        k_scale = tl.load(kv_scale_ptr)
        v_scale = tl.load(kv_scale_ptr + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for t in range(t0, t1):
        kv_pos = t * BLOCK_N + offs_n  # [BLOCK_N]
        kv_valid = kv_pos < seq_len
        block_id = tl.load(block_tables_ptr + seq * stride_bt + kv_pos // block_size, mask=kv_valid, other=0)
        slot = kv_pos % block_size
        block_id = block_id.to(tl.int64)
        k = tl.load(k_cache_ptr + block_id[None, :] * stride_kb + slot[None, :] * stride_ks + kv_head * stride_kh
                    + offs_d[:, None], mask=kv_valid[None, :] & d_valid[:, None], other=0.0)  # [D, BLOCK_N]
        v = tl.load(v_cache_ptr + block_id[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                    + offs_d[None, :], mask=kv_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, D]
        if HAS_KV_SCALE:
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        s = _dot(q, k, IEEE_DOT, DOT_IN_FP32) * scale  # [BLOCK_M, BLOCK_N] fp32
        if HAS_SOFTCAP:
            x = s / softcap
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))  # softcap * tanh(x)
        s = s * 1.4426950408889634  # log2 units: exp2 below
        allowed = kv_valid[None, :] & row_valid[:, None]
        causal = kv_pos[None, :] <= q_pos[:, None]
        if HAS_MASK:
            rel = kv_pos - ctx_len  # [BLOCK_N] index among the sequence's new tokens
            in_new = (rel >= 0) & (rel < tree_width)
            mval = tl.load(mask_ptr + flat_tok[:, None].to(tl.int64) * stride_mask + rel[None, :],
                           mask=row_valid[:, None] & in_new[None, :], other=0)
            tree = (rel[None, :] < 0) | (mval != 0)
            allowed = allowed & tl.where(is_tree, tree, causal)
        else:
            allowed = allowed & causal
        if HAS_WINDOW:
            allowed = allowed & (kv_pos[None, :] > win_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE_DOT, DOT_IN_FP32)  # [BLOCK_M, D]
        m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + flat_tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
    else:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        row = (flat_tok.to(tl.int64) * num_q_heads + head) * NUM_SPLITS + split  # [BLOCK_M]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=row_valid[:, None] & d_valid[None, :])
        tl.store(part_lse_ptr + row, lse, mask=row_valid)


# True when this process interprets Triton (TRITON_INTERPRET=1 was set before triton was imported).
IS_INTERPRETED = all(type(f).__name__ == "InterpretedFunction" for f in (_paged_attention_kernel, tl.sum))
_NUM_SMS: dict[int, int] = {}


def tree_query_positions(metadata) -> torch.Tensor:
    """[T] int32 logical position of each new token: a tree node sits one past its deepest ancestor
    (the count of its visible new tokens, itself included, minus one, past the cached context); tokens
    of sequences longer than the mask are causal. Once per step, on the device, no host sync."""
    key = "tree_query_positions"
    pos = metadata.derived.get(key)
    if pos is None:
        qsl, seq_lens, mask = metadata.query_start_loc.long(), metadata.seq_lens.long(), metadata.tree_mask
        q_lens = qsl[1:] - qsl[:-1]  # [B]
        num_tokens = mask.shape[0]
        seq = torch.repeat_interleave(torch.arange(q_lens.numel(), device=mask.device), q_lens,
                                      output_size=num_tokens)  # [T]
        idx = torch.arange(num_tokens, device=mask.device) - qsl[seq]  # [T] index among new tokens
        depth = torch.where(q_lens[seq] <= mask.shape[1], mask.long().sum(-1) - 1, idx)
        pos = metadata.derived[key] = ((seq_lens - q_lens)[seq] + depth).to(torch.int32)
    return pos


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: any small number exercises the split path the same way
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, max_query_len: int, num_sms: int) -> int:
    """KV splits per sequence: only for decode-like steps whose programs would leave most SMs idle."""
    if max_query_len > 1:
        return 1
    num_programs = num_seqs * num_kv_heads
    if num_programs >= num_sms:
        return 1
    return max(1, min(16, num_sms // num_programs, triton.cdiv(max_seq_len, 256)))


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    kv_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 32,
) -> torch.Tensor:
    """Attend q [T, Hq, D] (new tokens, grouped by sequence) to the paged cache -> out [T, Hq, D] in q's dtype.

    The cache must already hold this step's K/V (the backend writes them first). `metadata` is an
    ember.layers.attention.AttentionMetadata; only its device tensors and python sizes are read, so the call
    issues no host-device synchronization.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    num_seqs = metadata.num_seqs
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    group = num_heads // num_kv_heads
    g_pad = triton.next_power_of_2(group)
    block_m = max(16 if metadata.max_query_len == 1 else 64, g_pad)
    block_q = block_m // g_pad
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, metadata.max_seq_len, metadata.max_query_len,
                                       _num_sms(q.device))
    mask = metadata.tree_mask
    qpos = dummy = metadata.seq_lens
    if mask is not None:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.uint8)
        if sliding_window is not None:
            qpos = tree_query_positions(metadata)
    if num_splits > 1:
        part_out = torch.empty((num_tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    if q.device.type != "cuda" and not IS_INTERPRETED:
        raise RuntimeError("the Triton paged-attention kernel runs on CUDA, or on CPU with TRITON_INTERPRET=1 "
                           "set before triton is imported")
    _paged_attention_kernel[grid](
        out, part_out, part_lse, q, k_cache, v_cache,
        metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
        mask if mask is not None else dummy, qpos,
        kv_scale if kv_scale is not None else dummy,
        float(scale), float(logit_softcap or 0.0), int(sliding_window or 0),
        num_seqs, num_heads, kv_cache.shape[2],
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        metadata.block_tables.stride(0),
        mask.stride(0) if mask is not None else 0, mask.shape[1] if mask is not None else 0,
        NUM_Q_PER_KV=group, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=logit_softcap is not None,
        HAS_MASK=mask is not None, HAS_KV_SCALE=kv_scale is not None, NUM_SPLITS=num_splits,
        IEEE_DOT=q.dtype == torch.float32 or IS_INTERPRETED,
        DOT_IN_FP32=IS_INTERPRETED and q.dtype != torch.float32,
    )
    if num_splits > 1:
        # Merge the splits: each holds a normalized partial output and its log2-sum-exp.
        lse_max = part_lse.amax(-1, keepdim=True)  # [T, Hq, 1]
        w = torch.exp2(part_lse - lse_max)  # [T, Hq, S]; empty splits weigh 0
        merged = (part_out * w.unsqueeze(-1)).sum(-2) / w.sum(-1, keepdim=True)  # [T, Hq, D]
        out.copy_(merged)
    return out
