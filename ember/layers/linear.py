"""Linear layers with a quantization seam.

A `Linear` holds `weight [out, in]` (+ `bias [out]`) and delegates its matmul to a `QuantMethod`.
Fused projections (q|k|v, gate|up) are one `Linear` with several `output_sizes`: the checkpoint's
separate tensors load into row slices of the one weight, so the forward pass is a single matmul.
Weight formats (fp8, int8, int4, fp4) are `QuantMethod`s in `ember.layers.quant`, one class per file; a
layer gets one through `set_quant_method` before its (already quantized) tensors are loaded.

Tensor parallelism (`parallel` + `split`): a "column" layer keeps a slice of its output rows, each fused
segment sliced separately by its unit (heads; KV heads replicated when fewer than ranks); a "row" layer keeps
a slice of its input columns and all-reduces its output (bias added once, on rank 0). Loading always gets
the full checkpoint tensor and keeps only this rank's slice (`shard_tensor`), quantized formats included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.distributed.parallel import SINGLE, ParallelContext
from ember.layers import cpu_kernels
from ember.layers.row_groups import grouped_matmul


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
    """Plain `F.linear` in the model dtype (a step's prompt tails in a call of their own: ember.layers.row_groups)."""

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return grouped_matmul(lambda rows: cpu_kernels.linear(rows, layer.weight, layer.bias), x)


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
        parallel: ParallelContext = SINGLE,
        split: str | None = None,  # None (replicated) | "column" (output rows) | "row" (input columns)
        units: list[int] | None = None,  # column: slice granularity per output segment (head_dim); None: 1
        shards: list[tuple[int, int]] | None = None,  # column: explicit (start, size) per segment; row: [(start, size)]
        reduce_output: bool = True,  # row: False when the caller sums the partial outputs itself (FusedMoE, once)
    ):
        super().__init__()
        full_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.full_output_sizes, self.full_in_features = full_sizes, in_features
        self.parallel, self.reduce_output = parallel, reduce_output
        self.split = split if parallel.is_parallel else None
        self.segment_offsets = [0] * len(full_sizes)  # column: where each local segment starts in its full one
        if self.split == "column" and shards is not None:
            self.segment_offsets, full_sizes = [s for s, _ in shards], [n for _, n in shards]
        elif self.split == "column":
            full_sizes, self.segment_offsets = _column_shards(full_sizes, units, parallel)
        elif self.split == "row":
            start, count = shards[0] if shards else parallel.shard(in_features, "input features of a row-parallel linear")
            self.in_offset, in_features = start, count
        elif self.split is not None:
            raise ValueError(f"Linear split {split!r} is not one of None, 'column', 'row'")
        self.output_sizes = full_sizes
        self.in_features = in_features
        self.out_features = sum(self.output_sizes)
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self, bias, dtype, torch.device(device))
        self.lora = None  # ember.lora.LoRALinear, set by a LoRAManager: the adapter slots' weights for this layer

    @property
    def num_shards(self) -> int:
        return len(self.output_sizes)

    def load_weight(self, param_name: str, tensor: torch.Tensor, shard_id: int | None) -> None:
        """Copy a checkpoint tensor into `param_name` ("weight"/"bias"); shard_id picks a row slice."""
        param = getattr(self, param_name)
        if shard_id is None:
            dst = param.data
            tensor = self.shard_tensor(param_name, tensor)
        else:
            start = sum(self.output_sizes[:shard_id])
            dst = param.data.narrow(0, start, self.output_sizes[shard_id])
            if self.split == "column":
                tensor = self._column_slice(tensor, 0, [self.full_output_sizes[shard_id]], [shard_id],
                                            tuple(dst.shape))
            elif self.split == "row":
                tensor = self.shard_tensor(param_name, tensor) if param_name == "weight" else tensor
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(
                f"shape mismatch loading {param_name} (shard {shard_id}): expected {tuple(dst.shape)}, "
                f"checkpoint has {tuple(tensor.shape)}"
            )
        dst.copy_(tensor)

    def shard_tensor(self, param_name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of `param_name` given the whole (unsharded, all segments) tensor, in any stored
        format: the dims to slice are found by comparing the format's full and per-rank shapes."""
        if self.split is None:
            return full
        full_shape = self._param_shape(param_name, sum(self.full_output_sizes), self.full_in_features)
        local_shape = self._param_shape(param_name, self.out_features, self.in_features)
        if full_shape is None or tuple(full.shape) != full_shape:
            return full  # unknown or mismatched: the caller's shape check names it
        if self.split == "row":
            if param_name == "bias":  # added once, after the all-reduce sums the partial outputs
                return full if self.parallel.is_first else torch.zeros_like(full)
            for d, (f, l) in enumerate(zip(full_shape, local_shape)):
                if f != l:  # an input dim, maybe packed (int4: 2 per byte; group scales: 1 per group)
                    offset = self.in_offset * l // self.in_features
                    if f * self.in_features != l * self.full_in_features or offset * self.in_features != self.in_offset * l:
                        raise ValueError(f"{param_name} dim {d} ({f}) cannot be cut at input column {self.in_offset}")
                    full = full.narrow(d, offset, l)
            return full
        for d, (f, l) in enumerate(zip(full_shape, local_shape)):
            if f != l:
                full = self._column_slice(full, d, self.full_output_sizes, range(len(self.full_output_sizes)),
                                          local_shape)
        return full

    def _column_slice(self, full, dim: int, full_sizes, segments, local_shape) -> torch.Tensor:
        """Rows of this rank's segments from `full` (segments `segments`, sizes `full_sizes`, along `dim`);
        rows past the end of a segment (a padded vocabulary) stay zero."""
        out = torch.zeros(local_shape, dtype=full.dtype, device=full.device)
        src_start = dst_start = 0
        for size, seg in zip(full_sizes, segments):
            local = self.output_sizes[seg]
            n = max(0, min(local, size - self.segment_offsets[seg]))
            out.narrow(dim, dst_start, n).copy_(full.narrow(dim, src_start + self.segment_offsets[seg], n))
            src_start, dst_start = src_start + size, dst_start + local
        return out

    def _param_shape(self, param_name: str, out_f: int, in_f: int) -> tuple[int, ...] | None:
        if param_name == "bias":
            return (out_f,)
        specs = getattr(self.quant_method, "tensor_specs", None)
        if specs is None:
            return (out_f, in_f) if param_name == "weight" else None
        try:
            spec = specs(out_f, in_f).get(param_name)
        except ValueError as e:  # e.g. an int4 group that straddles two ranks' input columns
            raise ValueError(f"{type(self.quant_method).__name__} cannot split this layer over "
                             f"{self.parallel.world_size} ranks: {e}") from None
        return None if spec is None else tuple(spec[0])

    def set_quant_method(self, method: QuantMethod, dtype: torch.dtype, device: torch.device | str) -> None:
        """Switch to another weight format before loading: drops this layer's tensors, lets `method` create its own."""
        has_bias = self.bias is not None
        for name in list(self._parameters):
            delattr(self, name)
        self.quant_method = method
        method.create_weights(self, has_bias, dtype, torch.device(device))

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """lora: the forward's per-token adapter slots (ember.lora.LoRABatchMetadata, carried in the attention
        metadata), or None; used when adapters target this layer."""
        y = self.quant_method.apply(self, x)
        if self.lora is not None and lora is not None:
            y = self.lora.apply(x, y, lora)
        if self.split == "row" and self.reduce_output:  # row-parallel: sum the partial outputs
            return self.parallel.all_reduce(y)
        return y

    def extra_repr(self) -> str:
        split = f", split={self.split}" if self.split else ""
        return f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}{split}"


def _column_shards(full_sizes: list[int], units: list[int] | None, parallel: ParallelContext):
    """Per-rank segment sizes and their offsets in the full segments. A single unit-1 segment (a vocabulary)
    may not divide: each rank then takes ceil(size / ranks) rows and the last rank's tail is padding."""
    units = units or [1] * len(full_sizes)
    sizes, offsets = [], []
    for size, unit in zip(full_sizes, units):
        if len(full_sizes) == 1 and unit == 1 and size % parallel.world_size:
            per = -(-size // parallel.world_size)
            sizes.append(per)
            offsets.append(parallel.rank * per)
            continue
        if size % unit:
            raise ValueError(f"output size {size} is not a multiple of its unit {unit}")
        start, count = parallel.shard(size // unit, "heads of a column-parallel linear")
        sizes.append(count * unit)
        offsets.append(start * unit)
    return sizes, offsets
