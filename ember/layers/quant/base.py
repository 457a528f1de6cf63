"""What every quantized weight format shares: its stored tensors, how they are made, and a dequantizing matmul.

A `QuantizedMethod` is both halves of a format. At build time `quantize(weight)` turns a full-precision
`[out, in]` weight into the tensors the engine directory stores (names relative to the layer: `weight`,
`weight_scale`, ...). At load time `create_weights` makes empty parameters of exactly those shapes and
dtypes, the engine's tensors are copied in as they are (never re-quantized), `process_weights_after_loading`
may repack them for a kernel, and `apply` computes the layer. The default `apply` dequantizes the whole
weight on the fly and runs one matmul in the activation dtype; formats with a native kernel override it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.linear import Linear, QuantMethod


class QuantizedMethod(QuantMethod):
    name: str = ""  # registry key, as written in the engine manifest
    needs_activation_scale = False  # True: `quantize` takes the calibrated absmax of the layer's input

    def params(self) -> dict:
        """The format's settings, saved in the manifest next to `name` (e.g. group_size)."""
        return {}

    def tensor_specs(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Stored tensors: name -> (shape, dtype). Bias is not listed; it stays in the model dtype."""
        raise NotImplementedError

    def quantize(self, weight: torch.Tensor, input_amax: float | None = None) -> dict[str, torch.Tensor]:
        """weight [out, in] (any float dtype) -> the stored tensors, matching `tensor_specs`."""
        raise NotImplementedError

    def dequantize(self, layer: Linear) -> torch.Tensor:
        """The layer's weight back in float32, [out, in]."""
        raise NotImplementedError

    def is_native(self, device: torch.device) -> bool:
        """True where `apply` computes in the stored format instead of dequantizing first."""
        return False

    def compute_note(self, device: torch.device) -> str:
        """One line for the build log: how this format computes on `device`."""
        return f"{self.name}: no native kernel on {device.type}; weights are stored quantized and dequantized on the fly"

    # ---- the QuantMethod seam -------------------------------------------------------------------
    def create_weights(self, layer: Linear, bias: bool, dtype: torch.dtype, device: torch.device) -> None:
        layer.compute_dtype = dtype
        for name, (shape, tdtype) in self.tensor_specs(layer.out_features, layer.in_features).items():
            setattr(layer, name, nn.Parameter(torch.empty(shape, dtype=tdtype, device=device), requires_grad=False))
        layer.bias = (nn.Parameter(torch.empty(layer.out_features, dtype=dtype, device=device), requires_grad=False)
                      if bias else None)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(layer).to(x.dtype), layer.bias)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., 2n] in 0..15 -> uint8 [..., n]; element 2i in the low nibble, 2i+1 in the high one."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> codes [..., 2n] uint8 in 0..15 (inverse of `pack_nibbles`)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def pick_group_size(in_features: int, preferred: int) -> int:
    """The preferred group size if it divides the row, else the largest of 128/64/32 that does."""
    for g in (preferred, 128, 64, 32):
        if in_features % g == 0:
            return g
    raise ValueError(f"in_features {in_features} is not a multiple of 32, so no int4 group size fits")
