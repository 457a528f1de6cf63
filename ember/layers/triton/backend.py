"""`TritonAttentionBackend`: the paged-attention backend for CUDA devices.

Same contract as `TorchAttentionBackend.forward`: write this step's K/V into the cache at `slot_mapping`
(index_copy_, saturating into an fp8 cache like the torch backend), then attend with the Triton kernel
in `paged_attention.py`. No host-device synchronization, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from ember.layers.attention import AttentionBackend
from ember.layers.triton.paged_attention import paged_attention


class TritonAttentionBackend(AttentionBackend):
    """Paged attention through one Triton kernel for decode, chunked prefill and mixed batches."""

    def __init__(self, num_splits: int | None = None):
        self.num_splits = num_splits  # KV splits per sequence; None: chosen per step from the batch shape

    def forward(self, q, k, v, kv_cache, metadata, *, scale, sliding_window=None, logit_softcap=None, kv_scale=None):
        num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
        flat = kv_cache.view(2, num_blocks * block_size, kv_cache.shape[3], kv_cache.shape[4])  # [2, slots, Hk, D]
        if kv_cache.dtype == k.dtype:
            kv_scale = None
            flat[0].index_copy_(0, metadata.slot_mapping, k)
            flat[1].index_copy_(0, metadata.slot_mapping, v)
        else:  # fp8 cache: saturate (a plain cast overflows to NaN); write the bytes (index_copy_ has no fp8 on CPU)
            fmax = torch.finfo(kv_cache.dtype).max
            raw = flat.view(torch.uint8)  # [2, slots, Hk, D]
            for i, x in enumerate((k, v)):
                x8 = (x.float() / kv_scale[i]).clamp(-fmax, fmax).to(kv_cache.dtype)
                raw[i].index_copy_(0, metadata.slot_mapping, x8.view(torch.uint8))
            kv_scale = kv_scale.float()
        return paged_attention(q, kv_cache, metadata, scale=scale, sliding_window=sliding_window,
                               logit_softcap=logit_softcap, kv_scale=kv_scale, num_splits=self.num_splits)
