"""A step's matmuls run its prompt tails in calls of their own, so a seeded request repeats on an idle engine.

The second time a prompt is sent, the prefix cache supplies its full KV blocks and the step computes only the
tail: the tokens of its last block. The first time, those tokens were rows of a larger matmul (the whole prompt,
or a chunk of it), and a GEMM library picks its kernel, blocking and even a split of the reduction dimension by
the number of rows (oneDNN splits K across threads for a bf16 [M, 1536] x [1536, 576] at M = 160 but not 192;
fp32 uses a different kernel for one row than for two). The tail's hidden states, and so the last token's
logits, would then round differently the second time.

So while a step runs, every unquantized Linear computes the rows that are tails (a row whose position lies in
its sequence's last KV block, decodes included) in one call and the other rows in another. On an idle engine
the first run's tail call then has exactly the rows, and so the shape, of the second run's only call. The
attention backend splits its calls at the same place (ember.layers.attention). The cost: one more library call
per Linear in steps that mix tails with other rows (prefill chunks), none in decode-only steps.

The runner sets the grouping around a forward (`tail_grouping`); the matmul methods read it (`grouped_matmul`).
It is a context variable, not an argument, because it is per step and reaches every Linear of every model
without each call site passing it; a compiled forward does not see it (ember.compile makes no such promise).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class RowGroups:
    """Row indices of a step's tokens: `tails` (in their sequence's last KV block) and `rest`."""

    tails: torch.Tensor  # [T_tail] int64
    rest: torch.Tensor  # [T - T_tail] int64
    num_rows: int  # T


_current: contextvars.ContextVar[RowGroups | None] = contextvars.ContextVar("ember_row_groups", default=None)


def tail_groups(positions: torch.Tensor, seq_lens_per_token: torch.Tensor, block_size: int) -> RowGroups | None:
    """positions [T], seq_lens_per_token [T] (each token's KV length after the step) -> the grouping, or None
    when every row is a tail (decode-only steps, a cached prompt's tail) or none is."""
    is_tail = positions >= (seq_lens_per_token - 1) // block_size * block_size  # [T]
    num_tails = int(is_tail.sum())
    if num_tails in (0, is_tail.numel()):
        return None
    return RowGroups(is_tail.nonzero().flatten(), (~is_tail).nonzero().flatten(), is_tail.numel())


@contextlib.contextmanager
def tail_grouping(groups: RowGroups | None):
    token = _current.set(groups)
    try:
        yield
    finally:
        _current.reset(token)


def grouped_matmul(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) for x [T, K], with the step's tail rows and other rows in separate calls -> [T, N]."""
    if torch.compiler.is_compiling():  # a compiled forward is traced once for every step: no per-step grouping
        return fn(x)
    groups = _current.get()
    if groups is None or x.dim() != 2 or x.shape[0] != groups.num_rows:
        return fn(x)
    tails = fn(x.index_select(0, groups.tails))  # [T_tail, N]
    rest = fn(x.index_select(0, groups.rest))  # [T - T_tail, N]
    out = tails.new_empty((groups.num_rows, tails.shape[-1]))
    out.index_copy_(0, groups.tails, tails)
    out.index_copy_(0, groups.rest, rest)
    return out
