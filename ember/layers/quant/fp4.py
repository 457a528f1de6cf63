"""fp4: e2m1 weights in blocks of 16 with an fp8 (e4m3) scale per block and one fp32 scale per tensor
(NVIDIA's NVFP4 layout). Only Blackwell GPUs compute in fp4; nothing here does, so the weights are stored
packed, two values per byte (the memory saving is real), and each matmul dequantizes them first.
The block-scaled fp4 GEMMs take no bias, so layers with bias are refused at build.
"""

from __future__ import annotations

import torch

from ember.layers.quant.base import QuantizedMethod, pack_nibbles, unpack_nibbles
from ember.layers.quant.fp8 import FP8, FP8_MAX

BLOCK = 16
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of codes 0..7; bit 3 is the sign
_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def _lut(device) -> torch.Tensor:
    mags = torch.tensor(E2M1_VALUES, device=device)
    return torch.cat((mags, -mags))  # [16]: code -> value


class Fp4Method(QuantizedMethod):
    name = "fp4"
    supports_bias = False

    def tensor_specs(self, out_features, in_features):
        if in_features % BLOCK:
            raise ValueError(f"fp4: in_features {in_features} is not a multiple of the block size {BLOCK}")
        return {"weight": ((out_features, in_features // 2), torch.uint8),  # two e2m1 codes per byte
                "weight_scale": ((out_features, in_features // BLOCK), FP8),  # per-block scale
                "weight_scale_2": ((), torch.float32)}  # per-tensor scale of the block scales

    def quantize(self, weight, input_amax=None):
        out_f, in_f = weight.shape
        w = weight.float().view(out_f, in_f // BLOCK, BLOCK)  # [out, nb, 16]
        global_scale = (w.abs().amax() / (E2M1_MAX * FP8_MAX)).clamp(min=1e-12)
        block_scale = (w.abs().amax(-1) / E2M1_MAX / global_scale).clamp(max=FP8_MAX).to(FP8)  # [out, nb]
        eff = block_scale.float() * global_scale  # the scale dequantization will use
        scaled = torch.where(eff[..., None] > 0, w / eff[..., None].clamp(min=1e-30), torch.zeros_like(w))
        codes = torch.bucketize(scaled.abs(), _MIDPOINTS) + 8 * (scaled < 0)  # [out, nb, 16] in 0..15
        return {"weight": pack_nibbles(codes.view(out_f, in_f)), "weight_scale": block_scale,
                "weight_scale_2": global_scale.to(torch.float32)}

    def dequantize(self, layer):
        values = _lut(layer.weight.device)[unpack_nibbles(layer.weight).long()]  # [out, in]
        eff = layer.weight_scale.float() * layer.weight_scale_2  # [out, nb]
        return (values.view(layer.out_features, -1, BLOCK) * eff[..., None]).view(layer.out_features, -1)

    def compute_note(self, device):
        return ("fp4: no hardware here computes in fp4 (that needs Blackwell); weights are stored as e2m1, two per "
                "byte with fp8 block scales, and dequantized for every matmul (smaller, not faster)")
