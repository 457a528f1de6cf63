"""fp8: float8_e4m3fn weights with one scale per output channel, and a calibrated per-tensor input scale.

On GPUs with fp8 units (compute capability 8.9+: Ada, Hopper, Blackwell) the matmul runs in fp8 through
`torch._scaled_mm`: the input is scaled by the calibrated `input_scale` and cast to fp8, the output is
rescaled row-wise by the weight scales. Elsewhere the weight is dequantized on the fly.
"""

from __future__ import annotations

import torch

from ember.layers.linear import Linear
from ember.layers.quant.base import QuantizedMethod

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def to_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale, saturated to the fp8 range (a plain cast overflows to NaN), as float8_e4m3fn."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def has_fp8_units(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Method(QuantizedMethod):
    name = "fp8"
    needs_activation_scale = True

    def tensor_specs(self, out_features, in_features):
        return {"weight": ((out_features, in_features), FP8),  # [out, in]
                "weight_scale": ((out_features,), torch.float32),  # [out]: w = q * scale
                "input_scale": ((), torch.float32)}  # x ~ q_x * input_scale; 0: scale each call (uncalibrated)

    def quantize(self, weight, input_amax=None):
        w = weight.float()
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)  # [out]
        input_scale = torch.tensor(float(input_amax) / FP8_MAX if input_amax else 0.0, dtype=torch.float32)
        return {"weight": to_fp8(w, scale[:, None]), "weight_scale": scale, "input_scale": input_scale}

    def dequantize(self, layer):
        return layer.weight.float() * layer.weight_scale[:, None]

    def is_native(self, device):
        return has_fp8_units(device)

    def compute_note(self, device):
        if self.is_native(device):
            return "fp8: matmuls run on the GPU's fp8 units (torch._scaled_mm, calibrated input scales)"
        return (f"fp8: {device.type} has no fp8 matmul units; weights are stored in fp8 (half of bf16) and "
                "dequantized on the fly")

    def process_weights_after_loading(self, layer: Linear) -> None:
        layer.use_scaled_mm = self.is_native(layer.weight.device)
        layer.scale_b = layer.weight_scale.view(1, -1).contiguous()  # [1, out], row-wise output scale

    def apply(self, layer, x):
        if not layer.use_scaled_mm:
            return super().apply(layer, x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, in]
        s_in = layer.input_scale if float(layer.input_scale) > 0 else x2.abs().amax().float().clamp(min=1e-12) / FP8_MAX
        try:
            y = torch._scaled_mm(to_fp8(x2, s_in), layer.weight.t(), scale_a=s_in.expand(x2.shape[0], 1).contiguous(),
                                 scale_b=layer.scale_b, out_dtype=torch.bfloat16)  # [T, out]
        except RuntimeError:  # shapes the fp8 GEMM cannot take (dims not multiples of 16): dequantize instead
            layer.use_scaled_mm = False
            return super().apply(layer, x)
        y = y.to(x.dtype)
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*shape[:-1], layer.out_features)
