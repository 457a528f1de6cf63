"""Paged attention: the per-step metadata, its builder, and the attention backends.

The KV cache of one layer is `[2, num_blocks, block_size, num_kv_heads, head_dim]` (K then V). Each step
the backend writes the new tokens' K/V at `slot_mapping`, then attends every sequence's new queries
(positions `seq_len - query_len .. seq_len - 1`) to all of that sequence's cached K/V, causally.

`TorchAttentionBackend` is plain torch and runs on any device: decode tokens of the whole batch go
through one batched gather + SDPA (no Python loop over sequences); prefill chunks are attended one
sequence at a time. A GPU kernel backend slots in beside it behind `AttentionBackend.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where a step's tokens sit in the paged KV cache. Tokens are grouped by sequence, in batch order."""

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset each new token's K/V goes to
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative new-token counts per sequence
    seq_lens: torch.Tensor  # [B] int32: KV length per sequence after this step (cached + new)
    seq_lens_list: list[int]  # seq_lens as python ints
    query_lens_list: list[int]  # new tokens per sequence as python ints
    block_tables: torch.Tensor  # [B, max_blocks] int32: block ids per sequence, padded with 0
    max_query_len: int  # max(query_lens_list)
    max_seq_len: int  # max(seq_lens_list)
    is_all_decode: bool  # every sequence has exactly one new token
    # Seam for tree/lookahead verification: [T, max_seq_len] bool, True where token t may attend KV
    # position j of its own sequence. When set it replaces the causal (and sliding-window) mask.
    custom_mask: torch.Tensor | None = None
    # Per-step values the backend derives once and reuses in every layer (masks, index tensors).
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)


def build_attention_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str,
) -> AttentionMetadata:
    """Build one step's metadata from per-sequence lengths and block ids (ids of each sequence, in order)."""
    num_seqs = len(query_lens)
    max_blocks = max((len(b) for b in block_tables), default=0) or 1
    bt = torch.tensor([list(b) + [0] * (max_blocks - len(b)) for b in block_tables], dtype=torch.int32)
    bt = bt.view(num_seqs, max_blocks)  # [B, max_blocks]
    q_lens = torch.tensor(query_lens, dtype=torch.int64)
    s_lens = torch.tensor(seq_lens, dtype=torch.int64)
    qsl = torch.zeros(num_seqs + 1, dtype=torch.int64)
    torch.cumsum(q_lens, 0, out=qsl[1:])
    is_all_decode = all(q == 1 for q in query_lens)
    if is_all_decode:
        pos = s_lens - 1  # [B]
        slot = bt.gather(1, (pos // block_size).unsqueeze(1)).squeeze(1).long() * block_size + pos % block_size
    else:
        num_tokens = int(qsl[-1])
        seq_idx = torch.repeat_interleave(torch.arange(num_seqs), q_lens, output_size=num_tokens)  # [T]
        pos = torch.arange(num_tokens) - qsl[seq_idx] + (s_lens - q_lens)[seq_idx]  # [T]
        slot = bt[seq_idx, pos // block_size].long() * block_size + pos % block_size
    return AttentionMetadata(
        slot_mapping=slot.to(device),
        query_start_loc=qsl.to(torch.int32).to(device),
        seq_lens=s_lens.to(torch.int32).to(device),
        seq_lens_list=list(seq_lens),
        query_lens_list=list(query_lens),
        block_tables=bt.to(device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        is_all_decode=is_all_decode,
    )


class AttentionBackend:
    """Writes new K/V into the paged cache and attends. q [T, Hq, D], k/v [T, Hk, D] -> out [T, Hq, D]."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """kv_scale [2] (K, V): set when the cache holds a quantized dtype (fp8): values are stored divided by
        it and multiplied back when read."""
        raise NotImplementedError


def _dequant(kv: torch.Tensor, kv_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Gathered cache values [2, ...] in the cache dtype -> true K/V in `dtype`."""
    if kv_scale is None:
        return kv
    return kv.to(dtype) * kv_scale.to(dtype).view(2, *([1] * (kv.dim() - 1)))


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


def _attend(q, k, v, mask, scale, softcap, is_causal=False):
    """Dense attention with GQA. q [N, Hq, L, D], k/v [N, Hk, S, D], mask bool broadcastable to [N, *, L, S]."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    # Soft-capping is outside SDPA: explicit scores, grouped so no K/V copy is needed for GQA.
    n, hq, lq, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    g = hq // hk
    qg = q.reshape(n, hk, g * lq, d)  # [N, Hk, G*L, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [N, Hk, G*L, S]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(n, hk, g, lq, s)
    if is_causal:
        mask = torch.ones(lq, s, dtype=torch.bool, device=q.device).tril(s - lq)
    if mask is not None:
        mask = mask.view(mask.shape[0], 1, 1, lq, s) if mask.dim() == 4 else mask
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(n, hk, g * lq, s), v)  # [N, Hk, G*L, D]
    return out.view(n, hq, lq, d)


class TorchAttentionBackend(AttentionBackend):
    """Plain-torch paged attention for CPU (and any device)."""

    def forward(self, q, k, v, kv_cache, metadata, *, scale, sliding_window=None, logit_softcap=None, kv_scale=None):
        num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
        flat = kv_cache.view(2, num_blocks * block_size, kv_cache.shape[3], kv_cache.shape[4])
        if kv_cache.dtype == k.dtype:
            kv_scale = None
            flat[0].index_copy_(0, metadata.slot_mapping, k)
            flat[1].index_copy_(0, metadata.slot_mapping, v)
        else:  # fp8 cache: saturate (a plain cast overflows to NaN); copied as bytes (no fp8 index_copy on CPU)
            fmax = torch.finfo(kv_cache.dtype).max
            raw = flat.view(torch.uint8)
            for i, x in enumerate((k, v)):
                xq = (x.float() / kv_scale[i]).clamp(-fmax, fmax).to(kv_cache.dtype)
                raw[i].index_copy_(0, metadata.slot_mapping, xq.view(torch.uint8))
        if metadata.is_all_decode and metadata.custom_mask is None:
            return self._decode(q, kv_cache, metadata, metadata.block_tables, metadata.seq_lens,
                                metadata.max_seq_len, "all", scale, sliding_window, logit_softcap, kv_scale)
        return self._mixed(q, k, v, kv_cache, metadata, scale, sliding_window, logit_softcap, kv_scale)

    def _decode(self, q, kv_cache, md, block_tables, seq_lens, max_len, key, scale, window, softcap, kv_scale=None):
        """One new token per sequence, all sequences at once. q [B, Hq, D] -> [B, Hq, D].

        Grouped matmuls rather than SDPA: CPU SDPA's flash kernel is slow for single-token queries, and
        grouping the Hq/Hk query heads of a KV head needs no K/V expand. Six tensor ops in all.
        """
        block_size = kv_cache.shape[2]
        cache_key = ("decode", key, window, q.dtype)
        entry = md.derived.get(cache_key)
        if entry is None:  # once per step, shared by every layer
            nblk = -(-max_len // block_size)
            bt = block_tables[:, :nblk]  # [B, nblk]
            if window is None and key == "all" and all(n == max_len for n in md.seq_lens_list):
                bias = None  # equal lengths (batch 1 included): slicing off the block padding is the whole mask
            else:
                kv_pos = torch.arange(nblk * block_size, device=q.device)  # [S]
                last = (seq_lens.long() - 1).unsqueeze(1)  # [B, 1]
                visible = kv_pos <= last
                if window is not None:
                    visible &= kv_pos > last - window
                bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
                bias = bias[None, :, None, :]  # [1, B, 1, S]
            entry = md.derived[cache_key] = (bt, bias)
        bt, bias = entry
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads = kv_cache.shape[3]
        kv = gather_kv(kv_cache, bt)  # [2, Hk, B, S, D]
        if bias is None:
            kv = kv[..., :max_len, :]  # a view: every sequence is exactly max_len long
        kv = _dequant(kv, kv_scale, q.dtype)
        qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1)  # [Hk, B, G, D]
        if softcap is None:
            scores = torch.matmul(qg * scale, kv[0].transpose(-1, -2))  # [Hk, B, G, S]
        else:
            scores = torch.tanh(torch.matmul(qg, kv[0].transpose(-1, -2)) * (scale / softcap)) * softcap
        probs = torch.softmax(scores if bias is None else scores + bias, dim=-1)
        out = torch.matmul(probs, kv[1])  # [Hk, B, G, D]
        return out.transpose(0, 1).reshape(num_seqs, num_heads, head_dim)

    def _mixed(self, q, k, v, kv_cache, md, scale, window, softcap, kv_scale=None):
        """Decodes batched through `_decode`; each prefill chunk attended on its own."""
        out = torch.empty_like(q)
        plan = md.derived.get("plan")
        if plan is None:
            starts = [0]
            for n in md.query_lens_list:
                starts.append(starts[-1] + n)
            dec_seqs = [i for i, n in enumerate(md.query_lens_list) if n == 1] if md.custom_mask is None else []
            is_dec = set(dec_seqs)
            pre_seqs = [i for i, n in enumerate(md.query_lens_list) if n > 0 and i not in is_dec]
            dev = q.device
            dec_idx = torch.tensor([starts[i] for i in dec_seqs], dtype=torch.int64, device=dev)
            dec_sel = torch.tensor(dec_seqs, dtype=torch.int64, device=dev)
            dec_max_len = max((md.seq_lens_list[i] for i in dec_seqs), default=0)
            plan = md.derived["plan"] = (starts, dec_seqs, pre_seqs, dec_idx, dec_sel, dec_max_len)
        starts, dec_seqs, pre_seqs, dec_idx, dec_sel, dec_max_len = plan
        if dec_seqs:
            dec_out = self._decode(q[dec_idx], kv_cache, md, md.block_tables[dec_sel], md.seq_lens[dec_sel],
                                   dec_max_len, "mixed", scale, window, softcap, kv_scale)
            out.index_copy_(0, dec_idx, dec_out)
        block_size = kv_cache.shape[2]
        for i in pre_seqs:
            s, e = starts[i], starts[i + 1]
            seq_len, q_len = md.seq_lens_list[i], e - s
            ctx = seq_len - q_len
            qi = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
            if ctx == 0:  # no cached context: use the new K/V directly
                ki = k[s:e].transpose(0, 1).unsqueeze(0)  # [1, Hk, L, D]
                vi = v[s:e].transpose(0, 1).unsqueeze(0)
            else:
                nblk = -(-seq_len // block_size)
                kv = gather_kv(kv_cache, md.block_tables[i:i + 1, :nblk])[:, :, 0, :seq_len]  # [2, Hk, S, D]
                kv = _dequant(kv, kv_scale, q.dtype)
                ki, vi = kv[0].unsqueeze(0), kv[1].unsqueeze(0)  # [1, Hk, S, D]
            if md.custom_mask is not None:
                mask = md.custom_mask[s:e, :seq_len]
            elif ctx == 0 and window is None:
                out[s:e] = _attend(qi, ki, vi, None, scale, softcap, is_causal=True)[0].transpose(0, 1)
                continue
            else:
                q_pos = torch.arange(ctx, seq_len, device=q.device).unsqueeze(1)  # [L, 1]
                kv_pos = torch.arange(seq_len, device=q.device)  # [S]
                mask = kv_pos <= q_pos
                if window is not None:
                    mask &= kv_pos > q_pos - window
            out[s:e] = _attend(qi, ki, vi, mask[None, None], scale, softcap)[0].transpose(0, 1)
        return out


def get_attention_backend(device: torch.device | str) -> AttentionBackend:
    """The attention backend for a device: the Triton kernel on CUDA (when triton imports), plain torch elsewhere."""
    if torch.device(device).type == "cuda":
        try:
            from ember.layers.triton.backend import TritonAttentionBackend
        except ImportError:  # no triton on this install: the torch path still runs on CUDA
            return TorchAttentionBackend()
        return TritonAttentionBackend()
    return TorchAttentionBackend()
