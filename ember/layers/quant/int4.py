"""int4: weight-only, asymmetric, group-wise along the input dimension (groups of 32, 64 or 128).

Stored: `weight` uint8 [out, in/2] (two 4-bit codes per byte, low nibble first) and `weight_scale_zero`
bf16 [in/group, out, 2], the layout of PyTorch's int4 kernels: w = (q - 8) * scale + zero. On CPU the
codes are repacked once at load into the layout of `_weight_int4pack_mm_for_cpu` (replacing the portable
copy, so memory stays at half a byte per weight); elsewhere dequantize-and-matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.layers.linear import Linear
from ember.layers.quant.base import QuantizedMethod, pack_nibbles, unpack_nibbles


class Int4Method(QuantizedMethod):
    name = "int4"

    def __init__(self, group_size: int = 128):
        if group_size not in (32, 64, 128):
            raise ValueError(f"int4 group_size {group_size} is not one of 32, 64, 128")
        self.group_size = group_size

    def params(self):
        return {"group_size": self.group_size}

    def tensor_specs(self, out_features, in_features):
        if in_features % self.group_size:
            raise ValueError(f"int4: in_features {in_features} is not a multiple of group_size {self.group_size}")
        return {"weight": ((out_features, in_features // 2), torch.uint8),
                "weight_scale_zero": ((in_features // self.group_size, out_features, 2), torch.bfloat16)}

    def quantize(self, weight, input_amax=None):
        out_f, in_f = weight.shape
        w = weight.float().view(out_f, in_f // self.group_size, self.group_size)  # [out, G, g]
        lo, hi = w.amin(-1), w.amax(-1)  # [out, G]
        scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16).float()
        zero = (lo + 8 * scale).to(torch.bfloat16).float()
        # codes against the stored (rounded) scale and zero, so dequantization matches exactly what was chosen
        q = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).view(out_f, in_f)
        scale_zero = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()  # [G, out, 2]
        return {"weight": pack_nibbles(q), "weight_scale_zero": scale_zero.to(torch.bfloat16)}

    def dequantize(self, layer):
        out_f, in_f = layer.out_features, layer.in_features
        q = unpack_nibbles(layer.weight).float().view(out_f, in_f // self.group_size, self.group_size)
        sz = layer.weight_scale_zero.float().transpose(0, 1)  # [out, G, 2]
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(out_f, in_f)

    def is_native(self, device):
        return device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu")

    def compute_note(self, device):
        if self.is_native(device):
            return (f"int4 (group {self.group_size}): weight-only matmul through torch._weight_int4pack_mm_for_cpu "
                    "(4-bit weights read directly)")
        return super().compute_note(device)

    def process_weights_after_loading(self, layer: Linear) -> None:
        layer.kernel_scale_zero = None  # set: `weight` holds the kernel's layout
        if not self.is_native(layer.weight.device):
            return
        codes = unpack_nibbles(layer.weight).to(torch.int32)  # [out, in]
        try:
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
        except RuntimeError:  # shapes the kernel cannot tile: keep dequantize-and-matmul
            return
        layer.weight = nn.Parameter(packed, requires_grad=False)
        layer.kernel_scale_zero = layer.weight_scale_zero.to(layer.compute_dtype)

    def apply(self, layer, x):
        if layer.kernel_scale_zero is None:
            return super().apply(layer, x)
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1]).to(layer.compute_dtype)
        y = torch._weight_int4pack_mm_for_cpu(x2, layer.weight, self.group_size, layer.kernel_scale_zero)  # [T, out]
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*shape[:-1], layer.out_features).to(dtype)
