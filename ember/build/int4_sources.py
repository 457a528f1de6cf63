"""Where each int4 Linear's grid comes from in a build: the source file's own 4-bit grid, or GPTQ.

A Linear whose every checkpoint tensor is stored on a 4-bit grid (GGUF Q4_0/Q4_1/Q4_K) keeps that grid as it
is: the same codes, group size (32), scales and mins, so the engine computes with exactly the weights the file
holds. The parts of a fused Linear (q|k|v, gate|up) are stacked along the output rows, which keeps each
part's groups whole. A Linear with any part in another type (Q5/Q6/Q8, F16, BF16, safetensors) is rounded to
4 bits with GPTQ over the calibration text, at the build's group size; the embeddings and the output head are
never int4 (QuantScheme.covers), so they keep the precision they load with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.layers.linear import Linear
from ember.layers.quant.int4 import Int4Method


@dataclass
class LosslessLayer:
    """A Linear kept on its source's grid: its format and the tensors to store."""

    method: Int4Method
    tensors: dict[str, torch.Tensor]
    source_types: list[str]  # the GGUF type of each part, e.g. ["Q4_1", "Q4_1", "Q4_1"]


def lossless_int4_layers(model, checkpoint, paths: list[str]) -> dict[str, LosslessLayer]:
    """Linear path -> its lossless int4 tensors, for each of `paths` whose parts are all on a 4-bit grid."""
    wanted = set(paths)
    parts: dict[str, dict[int | None, object]] = {}
    for hf_name, grid in checkpoint.iter_int4_grids():
        name, shard = model._map_name(hf_name)
        path, _, pname = name.rpartition(".")
        if path in wanted and pname == "weight":
            parts.setdefault(path, {})[shard] = grid
    out = {}
    for path, grids in parts.items():
        layer: Linear = model.get_submodule(path)
        shard_ids = [None] if layer.num_shards == 1 else list(range(layer.num_shards))
        if set(grids) != set(shard_ids) or len({g.group_size for g in grids.values()}) != 1:
            continue  # a part is not 4-bit in the file (or an unfused tensor's groups differ): GPTQ instead
        ordered = [grids[s] for s in shard_ids]
        codes = torch.cat([g.codes for g in ordered])  # [out, in]
        scale = torch.cat([g.scale for g in ordered])  # [out, G]
        minimum = torch.cat([g.minimum for g in ordered])
        if tuple(codes.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"{path}: the file's 4-bit grid is {tuple(codes.shape)}, the layer "
                             f"[{layer.out_features}, {layer.in_features}]")
        method = Int4Method(ordered[0].group_size, scale_dtype=_exact_dtype(scale, minimum))
        out[path] = LosslessLayer(method, method.pack(codes, scale, minimum), [g.source_type for g in ordered])
    return out


def _exact_dtype(*tensors: torch.Tensor) -> str:
    """float16 when every value survives it unchanged (Q4_0, Q4_1), else float32 (Q4_K's d * sc products)."""
    if all(torch.equal(t.to(torch.float16).float(), t) for t in tensors):
        return "float16"
    return "float32"
