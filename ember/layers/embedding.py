"""Token embedding table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Module):
    """input_ids [T] -> [T, H]; `scale` multiplies the result (Gemma's sqrt(hidden), rounded to the dtype)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, scale: float | None = None, dtype, device):
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype, device=device), requires_grad=False)
        # HF rounds the scale to the model dtype before multiplying; do the same.
        self.scale = None if scale is None else torch.tensor(scale, dtype=dtype).item()

    def load_weight(self, param_name: str, tensor: torch.Tensor, shard_id: int | None = None) -> None:
        if tuple(tensor.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"shape mismatch loading embedding: expected {tuple(self.weight.shape)}, got {tuple(tensor.shape)}"
            )
        self.weight.data.copy_(tensor)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.weight)  # [T, H]
        return x if self.scale is None else x * self.scale
