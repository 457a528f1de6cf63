"""The LoRA delta of one Linear for a batch that mixes adapters (and the base model) token by token.

Every slot's A and B are stacked in device memory, so one step costs two matmuls per layer whatever the mix:

    t = x @ A_all^T            # [T, S*W]   every token through every active slot's A
    t *= mask                  # [T, S*W]   keep only the columns of the token's own slot (none for base tokens)
    y += t @ B_all             # [T, out]

W = num_shards * rank: a fused Linear (q|k|v, gate|up) gives each shard its own rank-wide block of A rows
and a block-diagonal B, so q and v of one adapter are separate LoRAs as in PEFT. The scaling is folded into
B. Computing all active slots for every token wastes S-1 of the (small) LoRA flops, but keeps the step at
three ops per layer, which on a CPU (and in a CUDA graph) beats gathering per-token weights or looping over
slots. Only the first `num_active_slots` slots are touched: the manager packs the step's adapters low.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class LoRABatchMetadata:
    """This step's token -> slot mapping, built once by `LoRAManager.prepare` and read by every LoRA layer."""

    slot_ids: torch.Tensor  # [T] int64: the slot of each token's adapter, -1 for the base model
    num_active_slots: int  # slots [0, num_active_slots) hold this step's adapters
    is_single_slot: bool  # every token uses slot 0: no masking needed
    dtype: torch.dtype
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)  # width W -> [T, num_active_slots * W]

    def mask(self, width: int) -> torch.Tensor | None:
        """[T, num_active_slots * width] 0/1 in the model dtype; None when every token is on slot 0."""
        if self.is_single_slot:
            return None
        m = self._masks.get(width)
        if m is None:
            slots = torch.arange(self.num_active_slots, device=self.slot_ids.device)
            onehot = (self.slot_ids[:, None] == slots[None, :]).to(self.dtype)  # [T, S]
            m = self._masks[width] = onehot.repeat_interleave(width, dim=1)  # [T, S * W]
        return m


class LoRALinear:
    """Per-slot LoRA weights of one `Linear`, attached as `linear.lora`; `apply` adds the batch's delta.

    a: [num_slots * W, in]; b: [num_slots * W, out]; slot s owns rows [s * W, (s + 1) * W) of both, shard k of
    a fused layer the rank-wide block k inside it (its B rows are zero outside shard k's output columns).
    """

    def __init__(self, linear, num_slots: int, rank: int, holder, dtype: torch.dtype, device: torch.device):
        self.output_sizes = list(linear.output_sizes)
        self.rank = rank
        self.width = len(self.output_sizes) * rank  # W
        self.holder = holder  # the LoRAManager: `holder.batch` is this step's LoRABatchMetadata or None
        self.a = torch.zeros(num_slots * self.width, linear.in_features, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots * self.width, linear.out_features, dtype=dtype, device=device)

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

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [..., in], y = base(x) [..., out] -> y + this step's LoRA delta (in place)."""
        meta: LoRABatchMetadata | None = self.holder.batch
        if meta is None:
            return y
        n = meta.num_active_slots * self.width
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        t = F.linear(x2, self.a[:n])  # [T, S * W]
        mask = meta.mask(self.width)
        if mask is not None:
            t.mul_(mask)
        if y.is_contiguous():
            y.view(-1, y.shape[-1]).addmm_(t, self.b[:n])  # [T, out]
            return y
        return torch.addmm(y.reshape(-1, y.shape[-1]), t, self.b[:n]).view(y.shape)
