"""The 4-bit grids of a GGUF's Q4_0, Q4_1 and Q4_K tensors, read as they are stored (never re-rounded).

All three are affine grids over groups of 32 weights along a row: w = scale * q + min with q in 0..15.
- Q4_1 block (32 weights): fp16 d, fp16 m, 16 bytes of codes: scale = d, min = m.
- Q4_0 block (32 weights): fp16 d, 16 bytes of codes: w = d * (q - 8), so scale = d, min = -8 d.
- Q4_K super-block (256 weights, 8 groups of 32): fp16 d and dmin, 6-bit sc and m per group, 128 bytes of
  codes: w = (d * sc) * q - dmin * m, so scale = d * sc, min = -(dmin * m).
In a Q4_0/Q4_1 block byte j holds weight j (low nibble) and weight j + 16 (high nibble); in a Q4_K
super-block each 32-byte chunk c holds group 2c (low nibbles) and group 2c + 1 (high nibbles).
Scales and mins are computed in float32 exactly as gguf's reference dequantizer computes them, so
`scale * q + min` (a product, then a sum, in float32) reproduces its output bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import Q4_K

from ember.checkpoint.gguf_reader import GGUFFile, GGUFTensorInfo

GROUP_SIZE = 32
INT4_TYPES = (T.Q4_0, T.Q4_1, T.Q4_K)


@dataclass
class Int4Grid:
    """One tensor's 4-bit codes and affine grid: w[r, c] = scale[r, c // 32] * codes[r, c] + min[r, c // 32]."""

    codes: torch.Tensor  # uint8 [rows, cols], 0..15
    scale: torch.Tensor  # float32 [rows, cols / 32]
    minimum: torch.Tensor  # float32 [rows, cols / 32]
    source_type: str  # "Q4_0" | "Q4_1" | "Q4_K"
    group_size: int = GROUP_SIZE

    def permute_rows(self, fn) -> "Int4Grid":
        """The grid with `fn` (a row permutation of a [rows, ...] tensor) applied to every part."""
        return Int4Grid(fn(self.codes), fn(self.scale), fn(self.minimum), self.source_type, self.group_size)


def int4_grid(gguf: GGUFFile, info: GGUFTensorInfo) -> Int4Grid | None:
    """The grid of a 2-D Q4_0/Q4_1/Q4_K tensor; None for any other type (or shape)."""
    if info.ggml_type not in INT4_TYPES or len(info.shape) != 2:
        return None
    rows, cols = info.shape
    raw = gguf.raw(info)  # [rows, row_bytes] uint8
    if info.ggml_type == T.Q4_K:
        blocks = raw.reshape(-1, 144)  # [rows * cols / 256, 144]
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())  # [n, 8] each
        scale = d * sc.astype(np.float32)  # [n, 8]
        minimum = -(dmin * m.astype(np.float32))
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        codes = (qs & 0x0F).reshape(rows, cols)  # [n, 4 chunks, 2 groups, 32] -> row order
    else:
        header = 4 if info.ggml_type == T.Q4_1 else 2
        blocks = raw.reshape(-1, header + 16)  # [rows * cols / 32, bytes per block]
        scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
        minimum = (blocks[:, 2:4].copy().view(np.float16).astype(np.float32) if info.ggml_type == T.Q4_1
                   else -8 * scale)
        qs = blocks[:, header:].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
        codes = (qs & 0x0F).reshape(rows, cols)  # [n, 2 halves, 16] -> row order
    groups = cols // GROUP_SIZE
    return Int4Grid(torch.from_numpy(np.ascontiguousarray(codes)),
                    torch.from_numpy(np.ascontiguousarray(scale.reshape(rows, groups), dtype=np.float32)),
                    torch.from_numpy(np.ascontiguousarray(minimum.reshape(rows, groups), dtype=np.float32)),
                    info.ggml_type.name)


def iter_gguf_int4_grids(gguf: GGUFFile, hf_config) -> Iterator[tuple[str, Int4Grid]]:
    """(hf_name, grid) for every 4-bit tensor of the file, with llama.cpp's Q/K row permutation undone as
    `iter_gguf_weights` undoes it for the dequantized tensors."""
    from ember.checkpoint.gguf_weights import _PERMUTED_QK_ARCHS, gguf_to_hf_names, unpermute_qk

    names = gguf_to_hf_names(gguf, hf_config)
    for gguf_name, info in gguf.tensors.items():
        # stacked experts ([E, ...]) are split per expert at load: their Linears are rounded with GPTQ instead
        grid = int4_grid(gguf, info) if gguf_name in names and "_exps." not in gguf_name else None
        if grid is None:
            continue
        if gguf.architecture in _PERMUTED_QK_ARCHS and ".attn_q." in gguf_name:
            grid = grid.permute_rows(lambda t: unpermute_qk(t, hf_config.num_attention_heads))
        elif gguf.architecture in _PERMUTED_QK_ARCHS and ".attn_k." in gguf_name:
            grid = grid.permute_rows(lambda t: unpermute_qk(t, hf_config.num_key_value_heads))
        yield names[gguf_name], grid
