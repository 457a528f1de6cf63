"""ParallelContext: which tensor-parallel rank a model is built for, and the few collectives its layers need.

A context is passed explicitly to model constructors (never read from global state). The default,
`SINGLE`, is one rank: every collective is the identity, so a tensor_parallel_count of 1 runs exactly
the single-process code. Layers ask it for their slice (`shard`) and call `all_reduce` (row-parallel
outputs, vocab-parallel embeddings) and `gather_first` (vocab-parallel logits to rank 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class CommStats:
    """What this rank's collectives moved and how long they blocked (for `ember bench` and the TP report)."""

    num_calls: int = 0
    num_bytes: int = 0  # payload bytes handed to the collectives by this rank
    seconds: float = 0.0  # wall time spent inside them (includes waiting for slower ranks)

    def reset(self) -> None:
        self.num_calls, self.num_bytes, self.seconds = 0, 0, 0.0


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: object = None  # torch.distributed ProcessGroup of the TP ranks; None: the default group
    # gloo sums low-precision partials in their own dtype; reduce in float32 and round once instead
    reduce_in_fp32: bool = False
    # mixture-of-experts layers: the experts are split into this many groups over the ranks (expert parallelism,
    # build.moe_expert_parallel_option); 1: every rank holds every expert (a slice of each)
    expert_parallel_size: int = 1
    stats: CommStats = field(default_factory=CommStats, compare=False)

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def shard(self, num_units: int, what: str = "units") -> tuple[int, int]:
        """(first unit, unit count) of this rank's share of `num_units` (KV groups, rows, columns).

        At least as many units as ranks: a balanced split (sizes differ by at most one, so 9 heads over 2
        ranks is 5 + 4). Fewer (e.g. KV heads): each rank takes one unit, replicated on world/num ranks
        (num_units must divide world_size)."""
        w, r = self.world_size, self.rank
        if num_units >= w:
            start = r * num_units // w
            return start, (r + 1) * num_units // w - start
        if w % num_units:
            raise ValueError(f"{what}: {num_units} cannot be replicated evenly over tensor_parallel_count={w}")
        return r * num_units // w, 1

    def shard_heads(self, num_heads: int, num_kv_heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((first q head, count), (first KV head, count)) of this rank. Heads split by KV group, so each rank
        keeps whole groups (the same q-per-KV ratio as the model); fewer KV heads than ranks: a KV head is
        replicated and its group's query heads are split between the replicas."""
        group = num_heads // num_kv_heads
        kv_start, kv_count = self.shard(num_kv_heads, "num_key_value_heads")
        if num_kv_heads >= self.world_size:
            return (kv_start * group, kv_count * group), (kv_start, kv_count)
        replicas = self.world_size // num_kv_heads
        if group % replicas:
            raise ValueError(f"num_attention_heads: {num_heads} query heads in {num_kv_heads} KV groups cannot be "
                             f"split over tensor_parallel_count={self.world_size}")
        per = group // replicas
        return (kv_start * group + (self.rank % replicas) * per, per), (kv_start, 1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks (identity on one rank)."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        t0 = time.perf_counter()
        buf = x.float() if self.reduce_in_fp32 and x.dtype != torch.float32 else x.contiguous()
        dist.all_reduce(buf, group=self.group)
        self._count(buf, t0)
        return buf.to(x.dtype) if buf.dtype != x.dtype else buf

    def gather_first(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Rank 0 gets every rank's `x` concatenated along `dim`; the other ranks get None."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        t0 = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=self._global_rank(0), group=self.group)
        self._count(x, t0)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        import torch.distributed as dist

        return dist.get_global_rank(self.group, group_rank)

    def _count(self, t: torch.Tensor, t0: float) -> None:
        self.stats.num_calls += 1
        self.stats.num_bytes += t.numel() * t.element_size()
        self.stats.seconds += time.perf_counter() - t0


SINGLE = ParallelContext()  # one rank: no collectives
