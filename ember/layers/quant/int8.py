"""int8: weight-only, symmetric, one scale per output channel. On CPU the matmul is PyTorch's packed
`_weight_int8pack_mm` (int8 weights read directly, no full-precision copy); elsewhere dequantize-and-matmul."""

from __future__ import annotations

import torch

from ember.layers.linear import Linear
from ember.layers.quant.base import QuantizedMethod


class Int8Method(QuantizedMethod):
    name = "int8"

    def tensor_specs(self, out_features, in_features):
        return {"weight": ((out_features, in_features), torch.int8),  # [out, in]
                "weight_scale": ((out_features,), torch.float32)}  # [out]: w = q * scale

    def quantize(self, weight, input_amax=None):
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out]
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"weight": q, "weight_scale": scale}

    def dequantize(self, layer):
        return layer.weight.float() * layer.weight_scale[:, None]

    def is_native(self, device):
        return device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm")

    def compute_note(self, device):
        if self.is_native(device):
            return "int8: weight-only matmul through torch._weight_int8pack_mm (int8 weights read directly)"
        return super().compute_note(device)

    def process_weights_after_loading(self, layer: Linear) -> None:
        # the kernel wants scales in the activation dtype
        layer.kernel_scale = layer.weight_scale.to(layer.compute_dtype) if self.is_native(layer.weight.device) else None

    def apply(self, layer, x):
        if layer.kernel_scale is None or x.dtype != layer.kernel_scale.dtype:
            return super().apply(layer, x)
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), layer.weight, layer.kernel_scale)  # [T, out]
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*shape[:-1], layer.out_features)
