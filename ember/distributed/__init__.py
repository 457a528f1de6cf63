"""Tensor parallelism on torch.distributed: the per-model ParallelContext, rank launch, the worker loop."""

from ember.distributed.parallel import SINGLE, CommStats, ParallelContext

__all__ = ["SINGLE", "CommStats", "ParallelContext"]
