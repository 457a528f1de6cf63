"""ember.layers.row_groups: a step's prompt-tail rows go through a matmul call of their own, so they see the call
shape a cached re-run of the prompt gives them, whatever the kernel does with the number of rows."""

from __future__ import annotations

import torch

from ember.layers.row_groups import grouped_matmul, tail_grouping, tail_groups


def _shape_sensitive(x: torch.Tensor) -> torch.Tensor:
    """A matmul whose rounding depends on how many rows share the call (as oneDNN's does for some shapes)."""
    return x @ torch.ones(x.shape[1], 3) + x.shape[0] * 1e-3


def test_tail_rows_of_a_step():
    # two prefills (40 and 20 new tokens, 0 and 10 cached) and one decode (KV 33), blocks of 16
    positions = torch.cat([torch.arange(40), torch.arange(10, 30), torch.tensor([32])])
    seq_lens = torch.tensor([40] * 40 + [30] * 20 + [33])
    groups = tail_groups(positions, seq_lens, 16)
    assert groups.tails.tolist() == list(range(32, 40)) + list(range(46, 60)) + [60]  # positions >= 32, >= 16, decode
    assert groups.rest.tolist() == list(range(32)) + list(range(40, 46))


def test_a_cached_rerun_sees_the_same_call_shape():
    x = torch.randn(40, 5)  # a 40-token prompt, all new: its tail (positions 32..39) is in the last block
    with tail_grouping(tail_groups(torch.arange(40), torch.full((40,), 40), 16)):
        first = grouped_matmul(_shape_sensitive, x)
    rerun = _shape_sensitive(x[32:40])  # blocks 0-1 from the prefix cache: the step is just the tail
    assert torch.equal(first[32:40], rerun)
    assert torch.equal(first[:32], _shape_sensitive(x[:32]))
    assert not torch.equal(_shape_sensitive(x)[32:40], rerun)  # ungrouped, the tail rounds with the whole prompt


def test_no_grouping_when_every_row_is_a_tail():
    positions, seq_lens = torch.tensor([5, 17, 40]), torch.tensor([6, 18, 41])  # decodes
    assert tail_groups(positions, seq_lens, 16) is None
    x = torch.randn(3, 4)
    with tail_grouping(None):
        assert torch.equal(grouped_matmul(_shape_sensitive, x), _shape_sensitive(x))
