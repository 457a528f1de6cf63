"""RMSNorm with an optional fused residual add.

`norm(x, residual)` returns `(rms_norm(x + residual), x + residual)`: the decoder layers thread the
residual stream through the norms so each add costs no separate Python-level step.
Gemma's `(1 + w)` variant stores `1 + w` (in float32) at load time so the forward pass is the same op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * w over the last dim; with `weight_offset=1.0` it is Gemma's y = x / rms(x) * (1 + w)."""

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        weight_offset: float = 0.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight_offset = weight_offset
        # Gemma computes (1 + w) in float32; rounding it to bf16 would lose most of w.
        pdtype = torch.float32 if weight_offset else dtype
        self.weight = nn.Parameter(torch.ones(dim, dtype=pdtype, device=device), requires_grad=False)

    def load_weight(self, param_name: str, tensor: torch.Tensor, shard_id: int | None = None) -> None:
        if tuple(tensor.shape) != (self.dim,):
            raise ValueError(f"shape mismatch loading norm weight: expected ({self.dim},), got {tuple(tensor.shape)}")
        self.weight.data.copy_(tensor.float() + self.weight_offset if self.weight_offset else tensor)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
            residual = x
        if self.weight_offset:
            out = F.rms_norm(x.float(), (self.dim,), self.weight, self.eps).to(x.dtype)
        else:
            out = F.rms_norm(x, (self.dim,), self.weight, self.eps)
        return out if residual is None else (out, residual)


class HeadRMSNorm(nn.Module):
    """Per-head RMSNorm over the head dim for q and k at once (Qwen3's q_norm/k_norm).

    Input is the q|k heads of one token side by side, `[T, num_q_heads + num_kv_heads, head_dim]`;
    the q heads use q_norm's weight and the k heads k_norm's, so both norms are one pass.
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, eps: float, *, dtype, device,
                 weight_offset: float = 0.0):
        super().__init__()
        self.num_q_heads, self.num_kv_heads, self.head_dim, self.eps = num_q_heads, num_kv_heads, head_dim, eps
        self.weight_offset = weight_offset  # Gemma 3: (1 + w), kept and applied in float32 as RMSNorm does
        pdtype = torch.float32 if weight_offset else dtype
        self.q_weight = nn.Parameter(torch.ones(head_dim, dtype=pdtype, device=device), requires_grad=False)
        self.k_weight = nn.Parameter(torch.ones(head_dim, dtype=pdtype, device=device), requires_grad=False)
        self._weight: torch.Tensor | None = None  # [Hq + Hk, D], built after loading

    def load_weight(self, param_name: str, tensor: torch.Tensor, shard_id: int | None = None) -> None:
        getattr(self, param_name).data.copy_(tensor.float() + self.weight_offset if self.weight_offset else tensor)
        self._weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, Hq + Hk, D]
        if self._weight is None:
            self._weight = torch.cat(
                [self.q_weight.expand(self.num_q_heads, -1), self.k_weight.expand(self.num_kv_heads, -1)]
            )
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_offset:
            return (xf * self._weight).to(x.dtype)
        return xf.to(x.dtype) * self._weight
