"""Fused mixture-of-experts MLP: top-k routing, then tokens grouped by expert so each active expert runs one
gate|up and one down matmul per step on its slice (sort by expert id, run, scatter-add the weighted results).

Every expert is a pair of `Linear`s, so the experts go through the same seams as any other layer: quantized
formats (`set_quant_method` by path, engine tensors loaded by name) and tensor-parallel slices (`shard_tensor`).

Tensor parallelism (a ParallelContext of W ranks, `expert_parallel_size` P dividing W): the experts are split
into P equal groups (expert parallelism) and each expert's intermediate dimension over the W / P ranks that
share its group (gate|up column-parallel, down row-parallel). Every rank then holds a partial sum of the
layer's output (its experts, its intermediate slice); one all-reduce per layer adds them up.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.distributed.parallel import ParallelContext, SINGLE
from ember.layers.activation import get_gated_activation
from ember.layers.linear import Linear


class Expert(nn.Module):
    """One expert's gate|up (column-parallel) and down (row-parallel, reduced by the FusedMoE) projections."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype, device, parallel: ParallelContext):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, [intermediate_size, intermediate_size], dtype=dtype, device=device,
                                   parallel=parallel, split="column")
        self.down_proj = Linear(intermediate_size, hidden_size, dtype=dtype, device=device, parallel=parallel,
                                split="row", reduce_output=False)


def expert_shard(parallel: ParallelContext, num_experts: int) -> tuple[range, ParallelContext]:
    """(the experts this rank holds, the context their intermediate dimension is split over)."""
    ep = parallel.expert_parallel_size
    if num_experts % ep:
        raise ValueError(f"trt_llm.build.moe_expert_parallel_option: {ep} does not divide the model's {num_experts} "
                         "experts evenly; use a divisor of the expert count or -1 (every expert on every rank)")
    per_group, group_ranks = num_experts // ep, parallel.world_size // ep
    group = parallel.rank // group_ranks
    inner = ParallelContext(rank=parallel.rank % group_ranks, world_size=group_ranks) if group_ranks > 1 else SINGLE
    return range(group * per_group, (group + 1) * per_group), inner


class FusedMoE(nn.Module):
    """router `gate` [E, H] (replicated, never quantized: QuantScheme.covers) + `experts` (this rank's, keyed by
    their global index).

    renormalize: divide the top-k probabilities (softmax over all experts) by their sum (Mixtral always,
    Qwen3-MoE when `norm_topk_prob`). hidden [T, H] -> [T, H].
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, act: str, *,
                 renormalize: bool, dtype, device, parallel: ParallelContext = SINGLE):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize, self.parallel = num_experts, top_k, renormalize, parallel
        self.intermediate_size = intermediate_size
        self.gate = Linear(hidden_size, num_experts, dtype=dtype, device=device)
        self.local_experts, inner = expert_shard(parallel, num_experts)
        self.experts = nn.ModuleDict({str(e): Expert(hidden_size, intermediate_size, dtype=dtype, device=device,
                                                     parallel=inner) for e in self.local_experts})
        self.act = get_gated_activation(act)

    def holds(self, expert: int) -> bool:
        """Whether this rank holds `expert` (always, without expert parallelism)."""
        return expert in self.local_experts

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> (weights [T, K] in hidden's dtype, expert ids [T, K])."""
        probs = torch.softmax(self.gate(hidden).float(), dim=-1)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K] each
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(hidden.dtype), ids

    def forward(self, hidden: torch.Tensor, lora=None) -> torch.Tensor:
        weights, ids = self.route(hidden)
        flat_ids = ids.reshape(-1)  # [T * K]
        first, num_local = self.local_experts.start, len(self.local_experts)
        if num_local == self.num_experts:
            slots = None
            local_ids = flat_ids
        else:  # expert parallelism: only the slots routed to this rank's experts
            slots = ((flat_ids >= first) & (flat_ids < first + num_local)).nonzero().flatten()  # [S]
            local_ids = flat_ids[slots] - first  # [S]
        order = torch.argsort(local_ids, stable=True)  # [S] slots grouped by expert
        slot_of = order if slots is None else slots[order]  # [S] index into the T * K slots
        token_of = slot_of // self.top_k  # [S] source token of each sorted slot
        counts = torch.bincount(local_ids, minlength=num_local).tolist()
        x = hidden[token_of]  # [S, H]
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            expert = self.experts[str(first + e)]
            h = self.act(expert.gate_up_proj(x[start : start + n]))  # [n, I / ranks]
            out[start : start + n] = expert.down_proj(h)  # [n, H], this rank's partial sum (reduced below)
            start += n
        out = out * weights.reshape(-1)[slot_of].unsqueeze(1)
        partial = torch.zeros_like(hidden).index_add_(0, token_of, out)  # [T, H]
        return self.parallel.all_reduce(partial)  # one reduce for every expert and intermediate slice
