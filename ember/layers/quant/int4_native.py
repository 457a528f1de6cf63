"""ember's own int4 CPU kernel (ember/csrc/quant_linear_cpu.cpp): 4-bit codes times activations split into two
int8 digits, with AVX-512 VNNI integer dot products, for bf16 engines on CPUs that have VNNI, BF16 and VBMI.

Why our own: torch's `_weight_int4pack_mm_for_cpu` converts every code to a float and multiplies in fp32,
which makes a decode step bound by arithmetic, not by the 4-bit weights it reads (about 15 G weights/s per
core here, the same as our first, bf16-dot-product version). Multiplying the codes as bytes by int8 digits
does 64 multiply-adds an instruction: one forward's Linears of SmolLM2 take 1.54 ms at one row vs 3.27 for
torch's kernel, 10.8 vs 19.8 at 16 rows (`ember bench int4`). One digit per activation (llama.cpp's Q8
activations) cost +1.1% perplexity on the default model; two (x ~ dx (x1 + x2 / 256)) keep the activations
more precisely than bf16 does, for twice the integer dot products. The min term uses the exact activation
sums. From GEMM_ROWS rows the weight is dequantized instead: where the CPU has AMX, tile by tile in cache, each
just before its tile products (ember/csrc/amx_linear_cpu.cpp; one layer's Linears of SmolLM2 at 64 rows 0.31 ms
vs 0.75 for a bf16 copy through oneDNN's GEMM), elsewhere to a bf16 copy in one pass for oneDNN. float32
engines keep torch's kernel, which is exact to fp32.

The kernel is built and loaded by ember.layers.cpu_kernels; where it cannot be, int4 layers use torch's
kernel and say so in the engine's compute note.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.layers import cpu_kernels

BLOCK = 16  # output rows per block of the layout (zmm lanes)
GROUP = 32  # weights per (scale, min) in the layout
GEMM_ROWS = 8  # from here dequantize and run a GEMM (AMX: equal at 8 rows on SmolLM2, `ember bench int4`)


def supports(dtype: torch.dtype, out_features: int, in_features: int, group_size: int) -> bool:
    return (dtype == torch.bfloat16 and out_features % BLOCK == 0 and in_features % 64 == 0
            and group_size % GROUP == 0 and cpu_kernels.load())


@dataclass
class NativeInt4Kernel:
    """One layer's weight in the kernel's layout (see ember/csrc/int4_cpu.cpp)."""

    packed: torch.Tensor  # uint8 [out, in/2]: blocks of 16 outputs, each [G, 4, 16, 4] bytes of nibble pairs
    scale: torch.Tensor  # [out/16, in/32, 16] float16 or float32
    minimum: torch.Tensor  # same

    @classmethod
    def create(cls, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
               group_size: int) -> "NativeInt4Kernel":
        """codes [out, in] (0..15), scale and min [out, in/group_size] -> the kernel's tensors."""
        out_f, in_f = codes.shape
        groups = in_f // GROUP
        c = codes.to(torch.uint8).view(out_f // BLOCK, BLOCK, groups, 2, 4, 4)  # [nb, lane, g, half, s, b]
        packed = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4).contiguous().view(out_f, in_f // 2)
        sdtype = scale.dtype if scale.dtype in (torch.float16, torch.float32) else torch.float32  # bf16: exact in fp32

        def blocked(t: torch.Tensor) -> torch.Tensor:  # [out, G'] -> [out/16, in/32, 16]
            t = t.to(sdtype).repeat_interleave(group_size // GROUP, dim=1)
            return t.view(out_f // BLOCK, BLOCK, groups).transpose(1, 2).contiguous()

        return cls(packed, blocked(scale), blocked(minimum))

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def codes(self) -> torch.Tensor:
        """The codes [out, in] (uint8, 0..15), back from the layout."""
        out_f, in_f = self.packed.shape[0], self.packed.shape[1] * 2
        p = self.packed.view(out_f // BLOCK, in_f // GROUP, 4, BLOCK, 4).permute(0, 3, 1, 2, 4)  # [nb, lane, g, s, b]
        return torch.stack((p & 0xF, p >> 4), dim=3).reshape(out_f, in_f)  # [nb, lane, g, half, s, b]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in]: scale * q, then + min, each rounded in float32 (as gguf rounds them)."""
        out_f, in_f = self.packed.shape[0], self.packed.shape[1] * 2

        def rows(t: torch.Tensor) -> torch.Tensor:  # [out/16, in/32, 16] -> [out, in/32, 1]
            return t.float().transpose(1, 2).reshape(out_f, in_f // GROUP, 1)

        q = self.codes().float().view(out_f, in_f // GROUP, GROUP)
        return (q * rows(self.scale) + rows(self.minimum)).view(out_f, in_f).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out] in x's dtype."""
        if x.dtype == torch.bfloat16 and x.is_contiguous():  # the engine's case: nothing to convert
            return torch.ops.ember_cpu.int4_linear(x, self.packed, self.scale, self.minimum, GEMM_ROWS)
        x2 = x.to(torch.bfloat16).contiguous()
        return torch.ops.ember_cpu.int4_linear(x2, self.packed, self.scale, self.minimum, GEMM_ROWS).to(x.dtype)
