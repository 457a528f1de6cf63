"""Paged KV cache allocation: one `[2, num_blocks, block_size, num_kv_heads, head_dim]` tensor per layer (K, V).

That is the logical shape every consumer indexes. On CPU the memory behind it is head-major
(`[2, num_kv_heads, num_blocks, block_size, head_dim]`, seen through a permuted view): gathering a batch's
blocks then yields per-head contiguous K/V that batched matmuls read without a transposing copy
(`ember.layers.attention.gather_kv`). On GPUs the Triton kernel reads the plain layout.
"""

from __future__ import annotations

import torch


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block costs across all layers (K and V), for sizing `num_blocks` from a memory budget."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """One zeroed cache per layer, each of logical shape `[2, num_blocks, block_size, num_kv_heads, head_dim]`."""
    if torch.device(device).type == "cpu":
        return [
            torch.zeros(2, num_kv_heads, num_blocks, block_size, head_dim, dtype=dtype, device=device)
            .permute(0, 2, 3, 1, 4)
            for _ in range(num_layers)
        ]
    return [
        torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        for _ in range(num_layers)
    ]
