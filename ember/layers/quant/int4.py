"""int4: weight-only, asymmetric, group-wise along the input dimension, on GGUF's grid: w = scale * q + min.

Stored: `weight` uint8 [out, in/2] (two 4-bit codes q in 0..15 per byte, low nibble first), `weight_scale` and
`weight_min` [out, in/group] in `scale_dtype` (float16 by default; float32 where a source grid needs it). This is
the grid of llama.cpp's Q4_1 (and Q4_0 and Q4_K's 32-weight sub-blocks, which are special cases of it), so an
engine built from such a GGUF keeps the file's codes, scales and mins exactly (`ember.build.gguf_int4`).

Compute: on CPU the codes are repacked once at load into a kernel's layout (replacing the portable copy, so
memory stays at half a byte per weight): ember's own VNNI kernel for bf16 layers where the CPU and a compiler
allow (`ember.layers.quant.int4_native`), torch's int4 kernels otherwise (`ember.layers.quant.int4_cpu`); each
call picks its path by its number of rows. Elsewhere dequantize-and-matmul.
"""

from __future__ import annotations

import torch

from ember.layers import cpu_kernels
from ember.layers.linear import Linear
from ember.layers.quant import int4_cpu, int4_native
from ember.layers.quant.base import QuantizedMethod, pack_nibbles, unpack_nibbles

GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Int4Method(QuantizedMethod):
    name = "int4"

    def __init__(self, group_size: int = 128, scale_dtype: str = "float16"):
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"int4 scale_dtype {scale_dtype!r} is not one of {', '.join(SCALE_DTYPES)}")
        self.group_size = group_size
        self.scale_dtype = scale_dtype

    def params(self):
        return {"group_size": self.group_size, "scale_dtype": self.scale_dtype}

    def tensor_specs(self, out_features, in_features):
        if in_features % self.group_size:
            raise ValueError(f"int4: in_features {in_features} is not a multiple of group_size {self.group_size}")
        groups, sdtype = in_features // self.group_size, SCALE_DTYPES[self.scale_dtype]
        return {"weight": ((out_features, in_features // 2), torch.uint8),  # codes, two per byte
                "weight_scale": ((out_features, groups), sdtype),  # [out, G]: w = scale * q + min
                "weight_min": ((out_features, groups), sdtype)}  # [out, G]

    # ---- build side -------------------------------------------------------------------------------------
    def grid(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Round-to-nearest grid of `weight` [out, in]: (scale, min), each [out, G] float32 and representable
        in `scale_dtype`, spanning each group's range."""
        out_f, in_f = weight.shape
        w = weight.float().reshape(out_f, in_f // self.group_size, self.group_size)  # [out, G, g]
        lo, hi = w.amin(-1), w.amax(-1)  # [out, G]
        sdtype = SCALE_DTYPES[self.scale_dtype]
        scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(sdtype).float()
        return scale, lo.to(sdtype).float()

    def codes(self, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        """Nearest codes [out, in] (int64, 0..15) of `weight` on the grid (scale, min) [out, G]."""
        out_f, in_f = weight.shape
        w = weight.float().reshape(out_f, -1, self.group_size)  # [out, G, g]
        q = torch.round((w - minimum[..., None]) / scale[..., None]).clamp(0, 15)
        return q.view(out_f, in_f).long()

    def quantize(self, weight, input_amax=None):
        scale, minimum = self.grid(weight)
        return self.pack(self.codes(weight, scale, minimum), scale, minimum)

    def pack(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> dict[str, torch.Tensor]:
        """codes [out, in] in 0..15 and the grid [out, G] -> the stored tensors. The grid must be exact in
        `scale_dtype` (it is checked), so that what is stored is what was chosen."""
        sdtype = SCALE_DTYPES[self.scale_dtype]
        stored_scale, stored_min = scale.to(sdtype), minimum.to(sdtype)
        if not (torch.equal(stored_scale.float(), scale.float()) and torch.equal(stored_min.float(), minimum.float())):
            raise ValueError(f"int4: the grid is not exact in {self.scale_dtype}; store it as float32")
        if codes.min() < 0 or codes.max() > 15:
            raise ValueError("int4: codes must lie in 0..15")
        return {"weight": pack_nibbles(codes), "weight_scale": stored_scale.contiguous(),
                "weight_min": stored_min.contiguous()}

    # ---- load and compute side --------------------------------------------------------------------------
    def dequantize(self, layer):
        """w = scale * q + min in float32, [out, in]: a product, then a sum, each rounded as gguf's own
        dequantization rounds them, so a lossless engine reproduces the GGUF's float32 weights bit for bit."""
        if getattr(layer, "cpu_kernel", None) is not None:
            return layer.cpu_kernel.dequantize(torch.float32)
        return self.dequantize_stored(layer.weight, layer.weight_scale, layer.weight_min)

    def dequantize_stored(self, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        """The stored tensors (as `pack` returns them) -> the weight [out, in] in float32."""
        out_f, groups = scale.shape
        q = unpack_nibbles(weight).float().view(out_f, groups, self.group_size)  # [out, G, g]
        prod = q * scale.float()[..., None]
        return (prod + minimum.float()[..., None]).view(out_f, groups * self.group_size)

    def is_native(self, device):
        return int4_cpu.is_available(device)

    def compute_note(self, device):
        if self.is_native(device):
            torch_note = (f"torch._weight_int4pack_mm_for_cpu (4-bit weights read directly) up to "
                          f"{int4_cpu.MAX_GEMV_ROWS} rows, larger batches dequantize to the activation dtype and "
                          "run one GEMM")
            if cpu_kernels.load():
                return (f"int4 (group {self.group_size}): bf16 layers use ember's VNNI kernel (4-bit codes times "
                        f"activations in two int8 digits) below {int4_native.GEMM_ROWS} rows, dequantize + GEMM from "
                        f"there (into AMX tiles where the CPU has them); float32 layers {torch_note}")
            return f"int4 (group {self.group_size}): {torch_note}"
        return super().compute_note(device)

    def process_weights_after_loading(self, layer: Linear) -> None:
        layer.cpu_kernel = None
        if not self.is_native(layer.weight.device):
            return
        codes = unpack_nibbles(layer.weight)  # [out, in] uint8
        if int4_native.supports(layer.compute_dtype, *codes.shape, self.group_size):
            kernel = int4_native.NativeInt4Kernel.create(codes, layer.weight_scale, layer.weight_min, self.group_size)
        else:
            kernel = int4_cpu.Int4CPUKernel.create(codes, layer.weight_scale, layer.weight_min, self.group_size,
                                                   layer.compute_dtype)
        if kernel is None:  # shapes the kernel cannot tile: keep dequantize-and-matmul
            return
        layer.cpu_kernel = kernel
        # `weight` now holds the kernel's layout (same shape); the grid lives in the kernel
        layer.weight.data = kernel.packed
        for name in ("weight_scale", "weight_min"):
            getattr(layer, name).data = torch.empty(0, dtype=getattr(layer, name).dtype)

    def apply(self, layer, x):
        if layer.cpu_kernel is None:
            return super().apply(layer, x)
        shape = x.shape
        y = layer.cpu_kernel.matmul(x.reshape(-1, shape[-1]))  # [T, out]
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*shape[:-1], layer.out_features)
