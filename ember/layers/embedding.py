"""Token embedding table; vocabulary-parallel under tensor parallelism (each rank holds a slice of the rows,
looks up the ids it owns, zeros the rest, and the ranks all-reduce)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.distributed.parallel import SINGLE, ParallelContext


class VocabEmbedding(nn.Module):
    """input_ids [T] -> [T, H]; `scale` multiplies the result (Gemma's sqrt(hidden), rounded to the dtype)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, scale: float | None = None, dtype, device,
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        self.vocab_size, self.hidden_size, self.parallel = vocab_size, hidden_size, parallel
        # rows [vocab_start, vocab_start + num_rows); the last rank's tail past vocab_size is zero padding
        self.num_rows = -(-vocab_size // parallel.world_size)
        self.vocab_start = parallel.rank * self.num_rows
        self.weight = nn.Parameter(torch.empty(self.num_rows, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        # HF rounds the scale to the model dtype before multiplying; do the same.
        self.scale = None if scale is None else torch.tensor(scale, dtype=dtype).item()

    def load_weight(self, param_name: str, tensor: torch.Tensor, shard_id: int | None = None) -> None:
        if tuple(tensor.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"shape mismatch loading embedding: expected {(self.vocab_size, self.hidden_size)}, "
                             f"got {tuple(tensor.shape)}")
        self.weight.data.copy_(self.shard_tensor(param_name, tensor))

    def shard_tensor(self, param_name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the full [vocab, hidden] table, zero-padded to `num_rows`."""
        if not self.parallel.is_parallel or tuple(full.shape) != (self.vocab_size, self.hidden_size):
            return full
        n = min(self.num_rows, self.vocab_size - self.vocab_start)
        out = torch.zeros(self.num_rows, self.hidden_size, dtype=full.dtype, device=full.device)
        out[:n].copy_(full[self.vocab_start : self.vocab_start + n])
        return out

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.parallel.is_parallel:
            x = F.embedding(input_ids, self.weight)  # [T, H]
        else:
            local = input_ids - self.vocab_start
            is_mine = (local >= 0) & (local < self.num_rows)  # [T]
            x = F.embedding(local.clamp(0, self.num_rows - 1), self.weight)  # [T, H]
            x = self.parallel.all_reduce(x * is_mine.unsqueeze(1).to(x.dtype))  # exactly one rank contributes
        return x if self.scale is None else x * self.scale
