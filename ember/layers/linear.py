"""Linear layers with a quantization seam.

A `Linear` holds `weight [out, in]` (+ `bias [out]`) and delegates its matmul to a `QuantMethod`.
Fused projections (q|k|v, gate|up) are one `Linear` with several `output_sizes`: the checkpoint's
separate tensors load into row slices of the one weight, so the forward pass is a single matmul.
Weight formats (fp8, int8, int4, fp4) are `QuantMethod`s in `ember.layers.quant`, one class per file; a
layer gets one through `set_quant_method` before its (already quantized) tensors are loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuantMethod:
    """How a Linear stores and applies its weight. Subclasses override any of the three hooks."""

    supports_bias = True  # False: the format's kernels take no bias, and models with bias are refused at build

    def create_weights(self, layer: "Linear", bias: bool, dtype: torch.dtype, device: torch.device) -> None:
        layer.weight = nn.Parameter(
            torch.empty(layer.out_features, layer.in_features, dtype=dtype, device=device), requires_grad=False
        )
        layer.bias = (
            nn.Parameter(torch.empty(layer.out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def process_weights_after_loading(self, layer: "Linear") -> None:
        """Called once after every shard is loaded (quantize, repack, drop the full-precision copy)."""

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedMethod(QuantMethod):
    """Plain `F.linear` in the model dtype."""

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class Linear(nn.Module):
    """y = x @ W^T (+ b); W is `[sum(output_sizes), in_features]`, one row slice per checkpoint shard."""

    def __init__(
        self,
        in_features: int,
        output_sizes: int | list[int],
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quant_method: QuantMethod | None = None,
    ):
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.in_features = in_features
        self.out_features = sum(self.output_sizes)
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self, bias, dtype, torch.device(device))

    @property
    def num_shards(self) -> int:
        return len(self.output_sizes)

    def load_weight(self, param_name: str, tensor: torch.Tensor, shard_id: int | None) -> None:
        """Copy a checkpoint tensor into `param_name` ("weight"/"bias"); shard_id picks a row slice."""
        param = getattr(self, param_name)
        if shard_id is None:
            dst = param.data
        else:
            start = sum(self.output_sizes[:shard_id])
            dst = param.data.narrow(0, start, self.output_sizes[shard_id])
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(
                f"shape mismatch loading {param_name} (shard {shard_id}): expected {tuple(dst.shape)}, "
                f"checkpoint has {tuple(tensor.shape)}"
            )
        dst.copy_(tensor)

    def set_quant_method(self, method: QuantMethod, dtype: torch.dtype, device: torch.device | str) -> None:
        """Switch to another weight format before loading: drops this layer's tensors, lets `method` create its own."""
        has_bias = self.bias is not None
        for name in list(self._parameters):
            delattr(self, name)
        self.quant_method = method
        method.create_weights(self, has_bias, dtype, torch.device(device))

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}"
