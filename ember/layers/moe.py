"""Fused mixture-of-experts MLP: top-k routing, then tokens grouped by expert so each active expert runs one
gate|up and one down matmul per step on its slice (sort by expert id, run, scatter-add the weighted results)."""

from __future__ import annotations

import torch
from torch import nn

from ember.layers.activation import get_gated_activation
from ember.layers.linear import Linear


class FusedMoE(nn.Module):
    """router `gate` [E, H] + experts' stacked weights: w13 [E, 2I, H] (gate rows, then up), w2 [E, H, I].

    renormalize: divide the top-k probabilities (softmax over all experts) by their sum (Mixtral always,
    Qwen3-MoE when `norm_topk_prob`). hidden [T, H] -> [T, H].
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, act: str, *,
                 renormalize: bool, dtype, device):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.intermediate_size = intermediate_size
        self.gate = Linear(hidden_size, num_experts, dtype=dtype, device=device)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype,
                                            device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype,
                                           device=device), requires_grad=False)
        self.act = get_gated_activation(act)
        self._loaded: set[tuple[int, str]] = set()

    def load_expert(self, expert: int, part: str, tensor: torch.Tensor) -> None:
        """One HF expert tensor; part is "gate" [I, H], "up" [I, H] or "down" [H, I]."""
        i = self.intermediate_size
        dst = {"gate": self.w13.data[expert, :i], "up": self.w13.data[expert, i:], "down": self.w2.data[expert]}[part]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"expert {expert} {part}: expected shape {tuple(dst.shape)}, found {tuple(tensor.shape)}")
        dst.copy_(tensor)
        self._loaded.add((expert, part))

    def missing_experts(self) -> list[str]:
        return [f"expert {e} {p}" for e in range(self.num_experts) for p in ("gate", "up", "down")
                if (e, p) not in self._loaded]

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> (weights [T, K] in hidden's dtype, expert ids [T, K])."""
        probs = torch.softmax(self.gate(hidden).float(), dim=-1)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K] each
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(hidden.dtype), ids

    def forward(self, hidden: torch.Tensor, lora=None) -> torch.Tensor:
        num_tokens, k = hidden.shape[0], self.top_k
        weights, ids = self.route(hidden)
        flat_ids = ids.reshape(-1)  # [T * K]
        order = torch.argsort(flat_ids, stable=True)  # [T * K] slots grouped by expert
        token_of = order // k  # [T * K] source token of each sorted slot
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        x = hidden[token_of]  # [T * K, H]
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            h = self.act(x[start : start + n] @ self.w13[e].t())  # [n, I]
            out[start : start + n] = h @ self.w2[e].t()  # [n, H]
            start += n
        out = out * weights.reshape(-1)[order].unsqueeze(1)
        return torch.zeros_like(hidden).index_add_(0, token_of, out)  # [T, H]
