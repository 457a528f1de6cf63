"""Batch-invariant matmuls (`ember.deterministic: true`): a row's output does not depend on how many rows
share its call or where it sits among them.

A GEMM library picks its blocking, its thread split and sometimes a split of the reduction dimension K by
the problem's shape. On this machine's oneDNN, a bf16 [M, 1536] x [1536, 576] product splits K across the
threads for some M (160, 256) and not others, so a token's MLP output rounds differently depending on how
many tokens its step carried; fp32 `F.linear` uses a different kernel for one row than for two.

Here every matmul of a layer is a run of calls of exactly one shape, [ROW_TILE, K] x [K, N]: the rows are
cut into tiles of ROW_TILE, the last tile padded with zero rows. A fixed shape means a fixed kernel, blocking
and reduction order, so a row's result depends only on its own values. At start-up each layer shape is
probed once with random rows placed at different positions among different neighbours; a shape whose rows
still move gets a smaller tile, down to one row per call (always invariant: every call is the same gemv).
The cost is the padding (a decode step of 3 sequences computes 16 rows) and one library call per tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.linear import Linear, QuantMethod, UnquantizedMethod

ROW_TILE = 16  # rows per matmul call: one AMX tile's height, so padding a decode batch costs little on CPU


class TiledMethod(QuantMethod):
    """Wraps a layer's weight format: its matmul runs as fixed-shape calls of `tile` rows."""

    def __init__(self, inner: QuantMethod, tile: int):
        self.inner = inner
        self.tile = tile
        self.supports_bias = inner.supports_bias

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        rows = x.reshape(-1, k)  # [M, K]
        m = rows.shape[0]
        pad = (-m) % self.tile
        if pad:
            rows = F.pad(rows, (0, 0, 0, pad))  # [M + pad, K]: zero rows complete the last tile
        outs = [self.inner.apply(layer, rows[i:i + self.tile]) for i in range(0, m + pad, self.tile)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs)  # [M + pad, N]
        return y[:m].reshape(*lead, y.shape[-1])


def _rows_move(layer: Linear, method: QuantMethod, tile: int, dtype: torch.dtype) -> bool:
    """Whether a row's result under `TiledMethod(method, tile)` changes with its position and neighbours."""
    gen = torch.Generator().manual_seed(0)
    device = next(iter(layer.parameters())).device
    x = torch.randn(3 * tile, layer.in_features, generator=gen).to(device=device, dtype=dtype)  # [3T, K]
    tiled = TiledMethod(method, tile)
    shift = tile // 2 + 1  # every shared row lands at another position, next to other rows
    a = tiled.apply(layer, x[: 2 * tile])  # [2T, N]
    b = tiled.apply(layer, x[shift: shift + 2 * tile - 1])  # [2T - 1, N]: a ragged last tile too
    return not torch.equal(a[shift:], b[: 2 * tile - shift])


def _choose_tile(layer: Linear, method: QuantMethod, dtype: torch.dtype) -> int:
    tile = ROW_TILE
    while tile > 1 and _rows_move(layer, method, tile, dtype):
        tile //= 2
    return tile


def make_batch_invariant(model: nn.Module, dtype: torch.dtype) -> dict[int, int]:
    """Wrap every Linear of `model` (and a tied LM head, given a Linear of its own that shares the embedding)
    in a fixed-shape `TiledMethod`. Returns {tile: number of layers} for the start-up log."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(model, "lm_head", 0) is None and embed is not None:
        rows, hidden = embed.weight.shape
        head = Linear(hidden, rows, dtype=embed.weight.dtype, device=embed.weight.device)
        head.weight = embed.weight  # shared, not copied
        model.lm_head = head  # compute_logits uses lm_head when it is set
    chosen: dict[tuple, int] = {}  # (method type, in, out) -> tile: one probe per layer shape
    counts: dict[int, int] = {}
    with torch.inference_mode():
        for module in model.modules():
            if not isinstance(module, Linear) or isinstance(module.quant_method, TiledMethod):
                continue
            method = module.quant_method or UnquantizedMethod()
            key = (type(method), module.in_features, module.out_features)
            if key not in chosen:
                chosen[key] = _choose_tile(module, method, dtype)
            module.quant_method = TiledMethod(method, chosen[key])
            counts[chosen[key]] = counts.get(chosen[key], 0) + 1
    return counts
