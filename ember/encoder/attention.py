"""Attention for one encoder forward: no paging, no cache kept. Every sequence is whole in the batch, so
attention is dense over its own tokens: bidirectional for BERT-family models, causal for causal embedders.

Tokens arrive packed (sequences side by side, `[T, ...]`); attention pads them into `[B, L_max, ...]`
once per layer. An equal-length batch (the common benchmark case, and what length-sorted batching
approaches) is a pure view: no copy, no mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.layers.attention import AttentionBackend, _attend


@dataclass
class EncoderMetadata:
    """Where each sequence's tokens sit in a packed batch. Built once per forward by `build_encoder_metadata`."""

    seq_lens_list: list[int]  # tokens per sequence
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative lengths (read by rotary's long-context switch)
    seq_lens: torch.Tensor  # [B] int32
    pad_index: torch.Tensor | None  # [T] int64: each token's row in the flattened [B * L_max] padded batch; None: equal lengths
    key_mask: torch.Tensor | None  # [B, 1, 1, L_max] bool: True for real keys; None: equal lengths

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)


def build_encoder_metadata(seq_lens: list[int], device: torch.device) -> EncoderMetadata:
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    qsl = torch.zeros(len(seq_lens) + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=qsl[1:])
    max_len = max(seq_lens)
    pad_index = key_mask = None
    if min(seq_lens) != max_len:
        seq_idx = torch.repeat_interleave(torch.arange(len(seq_lens)), lens)  # [T]
        offset = torch.arange(int(qsl[-1])) - qsl[seq_idx]  # [T]: position inside its sequence
        pad_index = (seq_idx * max_len + offset).to(device)
        key_mask = (torch.arange(max_len).unsqueeze(0) < lens.unsqueeze(1)).view(len(seq_lens), 1, 1, max_len).to(device)
    return EncoderMetadata(list(seq_lens), max_len, qsl.to(torch.int32).to(device), lens.to(torch.int32).to(device),
                           pad_index, key_mask)


def _to_padded(x: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
    """[T, H, D] packed -> [B, H, L_max, D]."""
    b, length = meta.num_seqs, meta.max_seq_len
    if meta.pad_index is None:
        return x.view(b, length, x.shape[1], x.shape[2]).transpose(1, 2)
    padded = x.new_zeros(b * length, x.shape[1], x.shape[2])
    padded.index_copy_(0, meta.pad_index, x)
    return padded.view(b, length, x.shape[1], x.shape[2]).transpose(1, 2)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: EncoderMetadata, *, scale: float,
                    is_causal: bool, logit_softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hk, D] (packed) -> [T, Hq, D]: each sequence attends to its own tokens (only those
    within `window` positions either side, when set: ModernBERT's local layers)."""
    num_tokens, hq, d = q.shape
    qp, kp, vp = _to_padded(q, meta), _to_padded(k, meta), _to_padded(v, meta)  # [B, H, L, D]
    mask = meta.key_mask
    if window is not None and meta.max_seq_len > window + 1:
        pos = torch.arange(meta.max_seq_len, device=q.device)
        band = (pos.unsqueeze(0) - pos.unsqueeze(1)).abs() <= window  # [L, L]
        mask = band if mask is None else mask & band  # [B, 1, L, L] or [L, L]
    if mask is not None and is_causal:
        length = meta.max_seq_len
        mask = mask & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()  # [B, 1, L, L]
        is_causal = False
    out = _attend(qp, kp, vp, mask, scale, logit_softcap, is_causal=is_causal)  # [B, Hq, L, D]
    out = out.transpose(1, 2).reshape(-1, hq, d)  # [B * L, Hq, D]
    return out if meta.pad_index is None else out.index_select(0, meta.pad_index)


class CausalEncoderBackend(AttentionBackend):
    """Stands in for the paged backend inside a decoder model used as an embedder: causal attention over
    each whole sequence, the KV cache argument ignored (there is none)."""

    def forward(self, q, k, v, kv_cache, metadata, *, scale, sliding_window=None, logit_softcap=None, kv_scale=None):
        if sliding_window is not None and metadata.max_seq_len > sliding_window:
            raise ValueError(f"sequences of {metadata.max_seq_len} tokens exceed the sliding window ({sliding_window}); "
                             "sliding-window embedders are limited to the window")
        return dense_attention(q, k, v, metadata, scale=scale, is_causal=True, logit_softcap=logit_softcap)
