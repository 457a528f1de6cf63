"""Paged attention: the per-step metadata, its builder, and the attention backends.

The KV cache of one layer is `[2, num_blocks, block_size, num_kv_heads, head_dim]` (K then V). Each step
the backend writes the new tokens' K/V at `slot_mapping`, then attends every sequence's new queries
(positions `seq_len - query_len .. seq_len - 1`) to all of that sequence's cached K/V, causally.

`TorchAttentionBackend` is plain torch and runs on any device: decodes and speculative verification
(a few new tokens per sequence, trees under a per-request mask) of the whole batch go through one
batched call (no Python loop over sequences); prefill chunks are attended one sequence at a time. A GPU kernel backend slots in beside it behind `AttentionBackend.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ember.layers.batched_attention import (attend_batch, dequant_kv, gather_kv, has_attention_kernel,
                                           is_head_major, plan_batch)
from ember.layers.invariant_attention import invariant_attention

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttentionBackend", "build_attention_metadata",
           "gather_kv", "get_attention_backend", "is_head_major"]


@dataclass
class AttentionMetadata:
    """Where a step's tokens sit in the paged KV cache. Tokens are grouped by sequence, in batch order."""

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset each new token's K/V goes to
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative new-token counts per sequence
    seq_lens: torch.Tensor  # [B] int32: KV length per sequence after this step (cached + new)
    seq_lens_list: list[int]  # seq_lens as python ints
    query_lens_list: list[int]  # new tokens per sequence as python ints
    block_tables: torch.Tensor  # [B, max_blocks] int32: block ids per sequence; entries past a sequence's
    # blocks are padding (0, or stale ids of the runner's persistent rows): never read past seq_lens
    max_query_len: int  # max(query_lens_list)
    max_seq_len: int  # max(seq_lens_list)
    is_all_decode: bool  # every sequence has exactly one new token
    # Tree/speculative verification: [T, M] bool. For a sequence with query_len <= M, row t column j says
    # whether its new token t may attend its new token j (its cached context, the KV positions before its
    # new tokens, is always visible); a sequence with query_len > M is causal and its rows are ignored.
    # None: every sequence is causal.
    tree_mask: torch.Tensor | None = None
    # ember.deterministic: attend every token through the same fixed-shape calls (ember.layers.invariant_attention)
    is_deterministic: bool = False
    # This forward's per-token LoRA adapter slots (ember.lora.LoRABatchMetadata, from LoRAManager.prepare),
    # read by every Linear an adapter targets; None: no adapter in the step. It rides here because this is
    # the one metadata object every layer of a forward receives.
    lora: object | None = None
    # The sliding-window layers' own view (their block table and slots) when the model keeps a separate table
    # for them (ember.core.window_blocks); None: every layer reads this one.
    window: "AttentionMetadata | None" = None
    # Per-step values the backend derives once and reuses in every layer (masks, index tensors).
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)


def build_attention_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]] | torch.Tensor,
    block_size: int,
    device: torch.device | str,
    *,
    is_deterministic: bool = False,
) -> AttentionMetadata:
    """Build one step's metadata from per-sequence lengths and block ids: a list of each sequence's ids,
    or a host int32 tensor [B, max_blocks] (the runner's persistent block table rows, padded)."""
    num_seqs = len(query_lens)
    if isinstance(block_tables, torch.Tensor):
        bt = block_tables  # [B, max_blocks]
    else:
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
        is_deterministic=is_deterministic,
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
    """Plain-torch paged attention for CPU (and any device).

    Sequences with few new tokens (decodes, and speculative chains and trees under `tree_mask`) go through
    one batched call (ember.layers.batched_attention); longer prefill chunks are attended one at a time.
    """

    def forward(self, q, k, v, kv_cache, metadata, *, scale, sliding_window=None, logit_softcap=None, kv_scale=None):
        if metadata.is_all_decode and logit_softcap is None and kv_cache.dtype == k.dtype:
            fast = metadata.derived.get(("decode", q.dtype))
            if fast is None:
                fast = metadata.derived[("decode", q.dtype)] = _decode_kernel_args(q, kv_cache, metadata)
            if fast:  # a decode step on CPU: write + attend in one C++ call (the batched path's same kernel)
                return torch.ops.ember_cpu.decode_step_attention(q, k, v, kv_cache, metadata.slot_mapping, *fast,
                                                                 scale, sliding_window or 0)
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
        if metadata.is_deterministic:
            return invariant_attention(q, kv_cache, metadata, scale=scale, window=sliding_window,
                                       softcap=logit_softcap, kv_scale=kv_scale)
        key = ("plan", sliding_window, q.dtype)
        plan = metadata.derived.get(key)
        if plan is None:  # once per step, shared by every layer
            plan = metadata.derived[key] = _plan_step(metadata, block_size, sliding_window, q.dtype, q.device)
        starts, batch, long_seqs = plan
        if batch is not None and batch.query_index is None:  # every token in the batched group, in order
            return attend_batch(q, kv_cache, batch, scale, logit_softcap, kv_scale)
        out = torch.empty_like(q)
        if batch is not None:
            res = attend_batch(q, kv_cache, batch, scale, logit_softcap, kv_scale)  # [B * Q, Hq, D]
            out.index_copy_(0, batch.out_tokens, res.index_select(0, batch.out_slots))
        for i in long_seqs:
            s, e = starts[i], starts[i + 1]
            seq_len = metadata.seq_lens_list[i]
            # A chunk reaching into its sequence's last KV block is attended in two calls: up to that block,
            # then the tail. A later identical prompt finds the earlier blocks in the prefix cache and computes
            # just that tail, with these same calls, so it comes out bit for bit the same (seeded requests repeat).
            tail = (seq_len - 1) // block_size * block_size
            if tail > seq_len - (e - s):
                head = e - (seq_len - tail)
                out[s:head] = self._prefill(q[s:head], k[s:head], v[s:head], kv_cache, metadata, i, scale,
                                            sliding_window, logit_softcap, kv_scale, seq_len=tail)
                s = head
            if e - s == 1:  # a 1-token tail: exactly the batched call its own decode-sized chunk would run
                one = metadata.derived.get(("tail", i, sliding_window, q.dtype))
                if one is None:
                    one = metadata.derived[("tail", i, sliding_window, q.dtype)] = plan_batch(
                        [0], [s, e], [1], [seq_len], metadata.block_tables[i:i + 1], block_size, None, sliding_window,
                        q.dtype, q.device)
                out[s:e] = attend_batch(q[s:e], kv_cache, one, scale, logit_softcap, kv_scale)
                continue
            out[s:e] = self._prefill(q[s:e], k[s:e], v[s:e], kv_cache, metadata, i, scale, sliding_window,
                                     logit_softcap, kv_scale)
        return out

    def _prefill(self, q, k, v, kv_cache, md, i, scale, window, softcap, kv_scale, seq_len=None):
        """One sequence's chunk of new tokens, causal over its cached context (its KV length `seq_len`, default
        the step's). q [L, Hq, D] -> [L, Hq, D]."""
        seq_len, q_len = seq_len or md.seq_lens_list[i], q.shape[0]
        ctx = seq_len - q_len
        qi = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
        if ctx == 0:  # no cached context: use the new K/V directly
            ki = k.transpose(0, 1).unsqueeze(0)  # [1, Hk, L, D]
            vi = v.transpose(0, 1).unsqueeze(0)
            if window is None:
                return _attend(qi, ki, vi, None, scale, softcap, is_causal=True)[0].transpose(0, 1)
        else:
            nblk = -(-seq_len // kv_cache.shape[2])
            kv = gather_kv(kv_cache, md.block_tables[i:i + 1, :nblk])[:, :, 0, :seq_len]  # [2, Hk, S, D]
            kv = dequant_kv(kv, kv_scale, q.dtype)
            ki, vi = kv[0].unsqueeze(0), kv[1].unsqueeze(0)  # [1, Hk, S, D]
        q_pos = torch.arange(ctx, seq_len, device=q.device).unsqueeze(1)  # [L, 1]
        kv_pos = torch.arange(seq_len, device=q.device)  # [S]
        mask = kv_pos <= q_pos
        if window is not None:
            mask &= kv_pos > q_pos - window
        return _attend(qi, ki, vi, mask[None, None], scale, softcap)[0].transpose(0, 1)


def _decode_kernel_args(q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata) -> tuple | bool:
    """(block_tables, seq_lens) for `ember_cpu::decode_step_attention` when it takes this all-decode step;
    False when it does not (the batched path then runs; it reaches the same attention kernel where it can)."""
    if md.is_deterministic or md.tree_mask is not None or md.slot_mapping.dtype != torch.int64:
        return False
    if not has_attention_kernel(q, kv_cache, md.block_tables, md.seq_lens):
        return False
    return md.block_tables, md.seq_lens


def _plan_step(md: AttentionMetadata, block_size: int, window, dtype, device):
    """(flat token offsets [B + 1], the batched group's BatchPlan or None, the sequences attended alone)."""
    starts = [0]
    for n in md.query_lens_list:
        starts.append(starts[-1] + n)
    width = md.tree_mask.shape[1] if md.tree_mask is not None else 1
    short = [i for i, n in enumerate(md.query_lens_list) if 0 < n <= width]
    long_seqs = [i for i, n in enumerate(md.query_lens_list) if n > width]
    batch = None
    if short:
        batch = plan_batch(short, starts, md.query_lens_list, md.seq_lens_list, md.block_tables, block_size,
                           md.tree_mask, window, dtype, device)
    return starts, batch, long_seqs


def get_attention_backend(device: torch.device | str) -> AttentionBackend:
    """The attention backend for a device: the Triton kernel on CUDA (when triton imports), plain torch elsewhere."""
    if torch.device(device).type == "cuda":
        try:
            from ember.layers.triton.backend import TritonAttentionBackend
        except ImportError:  # no triton on this install: the torch path still runs on CUDA
            return TorchAttentionBackend()
        return TritonAttentionBackend()
    return TorchAttentionBackend()
