"""The LoRA delta of one Linear for a batch that mixes adapters (and the base model) token by token.

Every slot's A and B are stacked in device memory. A step takes one of two paths, chosen once per step by
`LoRAManager.prepare` (see `LoRABatchMetadata.use_segments`):

Masked (decode-sized steps): two matmuls per layer whatever the mix,

    t = x @ A_all^T            # [T, S*W]   every token through every active slot's A
    t *= mask                  # [T, S*W]   keep only the columns of the token's own slot (none for base tokens)
    y += t @ B_all             # [T, out]

Computing all S slots for every token wastes S-1 of the (small) LoRA flops, but keeps the step at a few ops
per layer, which for a handful of tokens is what costs (each op's fixed cost dwarfs its flops). On a CPU in
bf16 both matmuls run on weights packed once for oneDNN, with the mask multiply and the add to y fused into
them as post-ops: two library calls per layer. The packed copies are made per power-of-two count of active
slots (the manager packs a step's adapters low), so one adapter in four slots costs one slot's work.

Segmented (prefill-sized steps): per active slot, only its tokens go through only its A and B (rows of one
slot are a slice when its requests are contiguous, else gathered), so the flops are exact; the few extra ops
per slot are nothing next to hundreds of tokens.

W = num_shards * rank: a fused Linear (q|k|v, gate|up) gives each shard its own rank-wide block of A rows
and a block-diagonal B, so q and v of one adapter are separate LoRAs as in PEFT. The scaling is folded into B.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ember.layers.cpu_pack import can_pack


@dataclass
class LoRABatchMetadata:
    """This step's token -> slot mapping, built once by `LoRAManager.prepare` and read by every LoRA layer."""

    slot_ids: torch.Tensor  # [T] int64: the slot of each token's adapter, -1 for the base model
    num_active_slots: int  # slots [0, num_active_slots) hold this step's adapters
    is_single_slot: bool  # every token uses slot 0: no masking needed
    dtype: torch.dtype
    # segmented path: (slot, rows) per slot with tokens; rows a slice or an int64 index tensor. None: masked path
    segments: list[tuple[int, slice | torch.Tensor]] | None = None
    _masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (W, slots) -> [T, slots * W]

    @property
    def use_segments(self) -> bool:
        return self.segments is not None

    def mask(self, width: int, num_slots: int | None = None) -> torch.Tensor | None:
        """[T, num_slots * width] 0/1 in the model dtype (num_slots: default the active ones); None when every
        token is on slot 0 and only slot 0 is computed."""
        num_slots = self.num_active_slots if num_slots is None else num_slots
        if self.is_single_slot and num_slots == 1:
            return None
        m = self._masks.get((width, num_slots))
        if m is None:
            slots = torch.arange(num_slots, device=self.slot_ids.device)
            onehot = (self.slot_ids[:, None] == slots[None, :]).to(self.dtype)  # [T, S]
            m = self._masks[(width, num_slots)] = onehot.repeat_interleave(width, dim=1).contiguous()
        return m


def slot_bucket(num_active: int, num_slots: int) -> int:
    """The packed slot count a step with `num_active` slots runs on: the next power of two, at most all."""
    return min(1 << max(num_active - 1, 0).bit_length(), num_slots)


def _packed(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)


class LoRALinear:
    """Per-slot LoRA weights of one `Linear`, attached as `linear.lora`; `apply` adds the batch's delta.

    a: [num_slots * W, in]; b: [num_slots * W, out]; slot s owns rows [s * W, (s + 1) * W) of both, shard k of
    a fused layer the rank-wide block k inside it (its B rows are zero outside shard k's output columns).
    """

    def __init__(self, linear, num_slots: int, rank: int, dtype: torch.dtype, device: torch.device):
        self.output_sizes = list(linear.output_sizes)
        self.rank = rank
        self.num_slots = num_slots
        self.width = len(self.output_sizes) * rank  # W
        self.a = torch.zeros(num_slots * self.width, linear.in_features, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots * self.width, linear.out_features, dtype=dtype, device=device)
        self.is_packed = can_pack(torch.device(device), dtype)  # bf16 on a CPU: oneDNN-packed copies for the masked path
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot bucket -> (A, B^T) packed

    def load_slot(self, slot: int, weights: dict | None) -> None:
        """Write one adapter's weights for this layer into `slot` (zeros where it does not target this layer).
        weights: {shard or None: (A [r, in], B [shard_out, r])} from `LoRAAdapter.weights`."""
        rows = slice(slot * self.width, (slot + 1) * self.width)
        self.a[rows].zero_()
        self.b[rows].zero_()
        for shard, (a, b) in (weights or {}).items():
            r = a.shape[0]
            k = 0 if shard is None else shard
            start = slot * self.width + k * self.rank
            col = 0 if shard is None else sum(self.output_sizes[:shard])
            self.a[start:start + r].copy_(a)
            self.b[start:start + r, col:col + b.shape[0]].copy_(b.t())
        self._packed.clear()  # repacked on next use

    def apply(self, x: torch.Tensor, y: torch.Tensor, meta: LoRABatchMetadata) -> torch.Tensor:
        """x [..., in], y = base(x) [..., out] -> y + the LoRA delta of `meta`'s token -> slot mapping (in place
        where it can)."""
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        y2 = y.reshape(-1, y.shape[-1])  # [T, out]
        if meta.use_segments:
            out = self._apply_segments(meta, x2, y2)
        elif self.is_packed:
            out = self._apply_packed(meta, x2, y2)
        else:
            out = self._apply_masked(meta, x2, y2)
        return out.view(y.shape)

    def _apply_masked(self, meta: LoRABatchMetadata, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        n = meta.num_active_slots * self.width
        t = F.linear(x2, self.a[:n])  # [T, S * W]
        mask = meta.mask(self.width)
        if mask is not None:
            t.mul_(mask)
        if y2.is_contiguous():
            return y2.addmm_(t, self.b[:n])
        return torch.addmm(y2, t, self.b[:n])

    def _apply_packed(self, meta: LoRABatchMetadata, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        slots = slot_bucket(meta.num_active_slots, self.num_slots)
        weights = self._packed.get(slots)
        if weights is None:
            n = slots * self.width
            weights = self._packed[slots] = (_packed(self.a[:n]), _packed(self.b[:n].t()))
        a, bt = weights
        x2 = x2.contiguous()
        mask = meta.mask(self.width, slots)
        if mask is None:
            t = torch.ops.mkldnn._linear_pointwise(x2, a, None, "none", [], "")
        else:  # t = (x @ A^T) * mask in one call
            t = torch.ops.mkldnn._linear_pointwise.binary(x2, mask, a, None, "mul")
        return torch.ops.mkldnn._linear_pointwise.binary(t, y2.contiguous(), bt, None, "add")  # y + t @ B

    def _apply_segments(self, meta: LoRABatchMetadata, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        if not y2.is_contiguous():
            y2 = y2.contiguous()
        w = self.width
        for slot, rows in meta.segments:
            a, b = self.a[slot * w:(slot + 1) * w], self.b[slot * w:(slot + 1) * w]
            if isinstance(rows, slice):
                y2[rows].addmm_(F.linear(x2[rows], a), b)
            else:
                y2.index_add_(0, rows, F.linear(x2.index_select(0, rows), a) @ b)
        return y2
