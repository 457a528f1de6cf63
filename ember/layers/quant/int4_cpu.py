"""int4 matmuls on CPU, picked per call by the number of rows.

Few rows (decode): `torch._weight_int4pack_mm_for_cpu`, which streams the 4-bit weights once and is faster than
a bf16 matrix-vector product. Its cost grows with every row (it has no reuse of a dequantized tile across rows),
so past MAX_GEMV_ROWS rows (prefill chunks) the weight is dequantized once to the activation dtype and one dense
GEMM (oneDNN, AMX/AVX-512) runs instead. The dequantization is a few contiguous passes over the weight (about
1.3 ms per 1.8M weights on one core here), which is what the int4 kernel costs at about 64 rows; neither comes
near the bf16 packed GEMM at batch 64 (about 10x its time): that needs the dequantization fused into the GEMM's
tiles (Inductor's CppWoqInt4GemmTemplate, AMX, under torch.compile with max_autotune and freezing).

torch's kernel computes w = (q - 8) * scale + zero; the format's grid is w = scale * q + min, so
zero = min + 8 * scale (in float32, then the activation dtype, the only one the kernel takes scales in).

The kernel's packed layout (`_convert_weight_to_int4pack_for_cpu`): output rows in blocks of 64, each block
[in, 32] bytes whose low nibbles are the block's rows 0..31 and high nibbles rows 32..63. The large-batch path
dequantizes straight from it, so only that one copy of the codes is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.layers.quant.base import unpack_nibbles

MAX_GEMV_ROWS = 64  # rows up to which the int4 kernel beats dequantize + GEMM (measured: `ember bench int4`)
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_N = 64  # output rows per block of the kernel's packed layout


def is_available(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu")


@dataclass
class Int4CPUKernel:
    """One layer's weight in torch's CPU int4 layout, and the two ways to multiply by it."""

    packed: torch.Tensor  # uint8 [out, in/2], the kernel's layout
    scale_zero: torch.Tensor  # [G, out, 2] in the activation dtype: (scale, zero = min + 8 * scale)
    group_size: int
    codes: torch.Tensor | None  # uint8 [out, in/2] portable codes, kept only where `out` is not a multiple of 64

    @classmethod
    def create(cls, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int,
               dtype: torch.dtype) -> "Int4CPUKernel | None":
        """codes [out, in] (0..15), scale and min [out, G] -> the kernel, or None where it cannot take the layer."""
        out_f, in_f = codes.shape
        if dtype not in KERNEL_DTYPES or out_f % 16 or in_f % 2:
            return None
        try:
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
        except RuntimeError:
            return None
        zero = minimum.float() + 8 * scale.float()  # [out, G]
        scale_zero = torch.stack((scale.float(), zero), dim=-1).transpose(0, 1).contiguous().to(dtype)  # [G, out, 2]
        portable = None if out_f % BLOCK_N == 0 else (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
        return cls(packed, scale_zero, group_size, portable)

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 2

    def dequantize_t(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight transposed, [in, out], in `dtype`, as the kernel sees it: q * scale + min with
        min = zero - 8 * scale. Every step is a contiguous pass (the kernel layout read as [in, out / 64, 32]
        nibble pairs is [in, out] once its halves sit side by side), so it runs at memory speed."""
        out_f, in_f, g = self.out_features, self.in_features, self.group_size
        groups = in_f // g
        scale = self.scale_zero[..., 0].contiguous()  # [G, out]
        minimum = (self.scale_zero[..., 1].float() - 8 * scale.float()).to(dtype)  # [G, out]
        if self.codes is None:
            nb = out_f // BLOCK_N
            p = self.packed.view(nb, in_f, BLOCK_N // 2).transpose(0, 1)  # [in, nb, 32]
            q = torch.cat((p & 0xF, p >> 4), dim=-1)  # [in, nb, 64] = [in, out]
        else:
            q = unpack_nibbles(self.codes).t().contiguous()  # [in, out]
        q = q.reshape(groups, g, out_f).to(dtype)  # [G, g, out]
        w = torch.addcmul(minimum.to(dtype)[:, None, :], q, scale.to(dtype)[:, None, :])  # [G, g, out]
        return w.view(in_f, out_f)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype` (a transposed copy of `dequantize_t`)."""
        return self.dequantize_t(dtype).t().contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] (any float dtype) -> [T, out] in x's dtype. Inside a compiled forward this is one opaque
        op, so the graph stays dynamic in T (the choice of kernel by T happens when it runs)."""
        if x.dtype == self.scale_zero.dtype and x.shape[0] <= MAX_GEMV_ROWS and x.is_contiguous() \
                and not torch.compiler.is_compiling():  # the decode path, with nothing to convert
            return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scale_zero)
        x2 = x.to(self.scale_zero.dtype).contiguous()
        if torch.compiler.is_compiling():
            y = torch.ops.ember.int4_matmul(x2, self.packed, self.scale_zero, self.group_size, self.codes)
        else:
            y = _int4_matmul(x2, self.packed, self.scale_zero, self.group_size, self.codes)
        return y.to(x.dtype)


def _int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                 codes: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] in the activation dtype -> [T, out]: the int4 kernel for few rows, dequantize + GEMM for many."""
    if x.shape[0] <= MAX_GEMV_ROWS:
        return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zero)
    return x @ Int4CPUKernel(packed, scale_zero, group_size, codes).dequantize_t(x.dtype)  # [T, out]


_lib = torch.library.Library("ember", "FRAGMENT")
_lib.define("int4_matmul(Tensor x, Tensor packed, Tensor scale_zero, int group_size, Tensor? codes) -> Tensor")
_lib.impl("int4_matmul", _int4_matmul, "CompositeExplicitAutograd")


@torch.library.register_fake("ember::int4_matmul", lib=_lib)
def _int4_matmul_fake(x, packed, scale_zero, group_size, codes):
    return x.new_empty((x.shape[0], packed.shape[0]))  # [T, out]
