"""bf16 linear layers on CPU, repacked once into oneDNN's blocked weight layout.

`F.linear` on a plain bf16 weight re-lays the weight out inside oneDNN on every call; a weight packed
once at load time skips that, which roughly doubles matrix-vector speed (batch-1 decode is nothing but
matrix-vector products). The packed kernel gives bit-identical results to `F.linear` and, like it,
computes each row independently of the rest of the batch. fp32 is left on `F.linear`: oneDNN's packed
fp32 kernel changes rounding with the batch size, and batch invariance matters more than its speed.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.layers.linear import Linear, QuantMethod, UnquantizedMethod
from ember.layers.row_groups import grouped_matmul


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_lib = torch.library.Library("ember", "FRAGMENT")
_lib.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


_lib.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("ember::packed_linear", lib=_lib)
def _packed_linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))  # [..., out]


class PackedCPUMethod(QuantMethod):
    """Unquantized bf16 matmul through a weight pre-packed for oneDNN."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.ember.packed_linear(x, layer.weight, layer.bias)
        return grouped_matmul(lambda rows: _packed_linear(rows, layer.weight, layer.bias), x)


def _packed(weight: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1), requires_grad=False)


def pack_model_for_cpu(model: nn.Module) -> int:
    """Repack every unquantized bf16 Linear of `model` in place (serving only: a packed weight can't be
    read back as a plain tensor). A tied LM head gets a packed copy of the embedding. Returns how many
    layers were packed."""
    num = 0
    for module in model.modules():
        if isinstance(module, Linear) and type(module.quant_method) is UnquantizedMethod \
                and can_pack(module.weight.device, module.weight.dtype):
            module.weight = _packed(module.weight)
            module.quant_method = PackedCPUMethod()
            num += 1
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(model, "lm_head", 0) is None and embed is not None and can_pack(embed.weight.device, embed.weight.dtype):
        rows, hidden = embed.weight.shape
        head = Linear(hidden, rows, dtype=embed.weight.dtype, device=embed.weight.device)
        head.weight = _packed(embed.weight)
        head.quant_method = PackedCPUMethod()
        model.lm_head = head  # compute_logits uses lm_head when it is set
        num += 1
    return num
