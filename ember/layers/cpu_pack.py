"""bf16 linear layers on CPU, laid out once at load time for the kernel that runs them; an LM head whose weights
lie on an 8-bit grid runs in 8 bits.

`F.linear` on a plain bf16 weight re-lays the weight out inside oneDNN on every call. Where the CPU has AMX
(and ember's kernels built), each weight is laid out as AMX's B operand (`tile_bf16`) and runs
`ember_cpu::bf16_linear` (ember/csrc/amx_linear_cpu.cpp): a batch-1 decode step streams the weights at ~1.6x
oneDNN's packed gemv, a 64-row batch in 0.7x its time, and every row's result is independent of its batch.
Elsewhere the weight is repacked into oneDNN's blocked layout, which roughly doubles matrix-vector speed over
`F.linear` and gives bit-identical results to it. fp32 is left on `F.linear` (and ember_cpu::f32_linear for
few rows): oneDNN's packed fp32 kernel changes rounding with the batch size.

The LM head is the largest matrix a decode step reads (SmolLM2: 56 MB of its 110). When its weights came from
an 8-bit source, GGUF's Q8_0 (the default model's embedding is), every 32 of them are already d * q with q in
-127..127, and bf16 only rounded that product. `q8_grid` recovers the grid (a matrix that never was 8-bit
stays bf16), and the head runs `ember_cpu::int8_linear` (ember/csrc/quant_linear_cpu.cpp) on it: half the
bytes of bf16, activations in two int8 digits.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.layers import cpu_kernels
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


class AMXMethod(QuantMethod):
    """Unquantized bf16 matmul on AMX tiles (`ember_cpu::bf16_linear`), the weight in `tile_bf16`'s layout. Rows
    are independent of their batch at every row count, so no tail grouping (ember.layers.row_groups) is needed."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        return torch.ops.ember_cpu.bf16_linear(x2, layer.weight, layer.bias).view(*shape[:-1], -1)


def can_tile(weight: torch.Tensor) -> bool:
    """`weight` [N, K] can run on AMX tiles: bf16 on a CPU with AMX, N a multiple of 16 and K of 32."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 32 == 0 and cpu_kernels.amx_available())


def tile_bf16(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> the same values as AMX B tiles, [N / 16][K / 32][16 k-pairs][16 outputs][2], viewed as [N, K]:
    each 1 KB tile (16 outputs x 32 k) contiguous, two consecutive k of an output side by side."""
    n, k = weight.shape
    return weight.detach().reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous().view(n, k)


def _packed(weight: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1), requires_grad=False)


Q8_MAX_REL_ERROR = 2.0 ** -7  # per weight; bf16 itself rounds to 2^-9 of it


def q8_grid(weight: torch.Tensor, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The 8-bit grid `weight` [N, K] was made from, in the kernel's layout: (codes uint8 [N, K], q + 128 in
    blocks of 16 outputs; scales float32 [N / 16, K / 32, 16]); None when the weights never were 8-bit (the
    grid misses some weight by more than Q8_MAX_REL_ERROR of it) or the shape does not tile.

    Q8_0's grid is w = d * q per 32 weights, q in -127..127, d = absmax / 127; what is here are those
    products rounded to the model dtype. The codes come from d ~ absmax / 127, then d is refit to them by
    least squares (averaging out the rounding) and the codes redone, twice. On the default model's embedding
    the grid reproduces every weight within 0.6% of it; a bf16-trained matrix misses by up to 100%."""
    n, k = weight.shape
    if n % 16 or k % 32:
        return None
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // 32, 1)
    for r0 in range(0, n, rows_per_chunk):  # chunks: the float temporaries stay in cache
        w = weight[r0:r0 + rows_per_chunk].float().view(-1, k // 32, 32)
        d = w.abs().amax(-1, keepdim=True) / 127  # [R, G, 1]
        for _ in range(3):
            q = torch.where(d > 0, w / d, torch.zeros_like(w)).round_().clamp_(-127, 127)
            qq = (q * q).sum(-1, keepdim=True)
            d = torch.where(qq > 0, (q * w).sum(-1, keepdim=True) / qq.clamp(min=1), torch.zeros_like(d))
        if bool(((q * d - w).abs() > Q8_MAX_REL_ERROR * w.abs()).any()):
            return None
        codes[r0:r0 + rows_per_chunk] = (q + 128).to(torch.uint8).view(-1, k)
        scales[r0:r0 + rows_per_chunk] = d
    codes = codes.view(n // 16, 16, k // 32, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
    return codes.view(n, k), scales.view(n // 16, 16, k // 32).transpose(1, 2).contiguous()


class Q8HeadMethod(QuantMethod):
    """An LM head on its 8-bit grid (`q8_grid`): `weight` holds the codes, `weight_scale` the scales."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        return torch.ops.ember_cpu.int8_linear(x2, layer.weight, layer.weight_scale).view(*shape[:-1], -1)


def _q8_head(weight: torch.Tensor) -> Linear | None:
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not cpu_kernels.load():
        return None
    grid = q8_grid(weight)
    if grid is None:
        return None
    rows, hidden = weight.shape
    head = Linear(hidden, rows, dtype=weight.dtype, device=weight.device)
    head.weight = nn.Parameter(grid[0], requires_grad=False)
    head.weight_scale = grid[1]
    head.quant_method = Q8HeadMethod()
    return head


def _relay(layer: Linear, weight: torch.Tensor) -> bool:
    """Give `layer` `weight` in the layout of the fastest bf16 CPU kernel that takes it; False if none does."""
    if can_tile(weight):
        layer.weight = nn.Parameter(tile_bf16(weight), requires_grad=False)
        layer.quant_method = AMXMethod()
    elif can_pack(weight.device, weight.dtype):
        layer.weight = _packed(weight)
        layer.quant_method = PackedCPUMethod()
    else:
        return False
    return True


def pack_model_for_cpu(model: nn.Module) -> int:
    """Re-lay every unquantized bf16 Linear of `model` in place, for AMX tiles where it can run on them
    (`can_tile`), for oneDNN otherwise (serving only: neither layout reads back as a plain weight). The LM head
    (its own, or the tied embedding's) runs on its 8-bit grid when it has one; a tied one otherwise gets a
    re-laid copy of the embedding. Returns how many layers were re-laid."""
    num = 0
    head = getattr(model, "lm_head", 0)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if isinstance(head, Linear) and type(head.quant_method) is UnquantizedMethod and head.bias is None:
        head_weight = head.weight
    else:
        head_weight = embed.weight if head is None and embed is not None else None
    if head_weight is not None and (q8 := _q8_head(head_weight)) is not None:
        model.lm_head = q8  # compute_logits uses lm_head when it is set
        num += 1
    for module in model.modules():
        if isinstance(module, Linear) and type(module.quant_method) is UnquantizedMethod:
            num += _relay(module, module.weight)
    if getattr(model, "lm_head", 0) is None and embed is not None:
        rows, hidden = embed.weight.shape
        head = Linear(hidden, rows, dtype=embed.weight.dtype, device=embed.weight.device)
        if _relay(head, embed.weight):
            model.lm_head = head  # compute_logits uses lm_head when it is set
            num += 1
    return num
