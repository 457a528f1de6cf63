"""ember.deterministic's matmuls (ember.layers.invariant_linear): a row's result is the same whatever rows share
its call, checked on real layer shapes in bf16 and fp32 against the same rows computed alone, and the start-up
probe picks a smaller tile for a kernel whose rows move with their position."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.layers.cpu_pack import PackedCPUMethod, _packed, can_pack
from ember.layers.invariant_linear import ROW_TILE, TiledMethod, _choose_tile, make_batch_invariant
from ember.layers.linear import Linear, QuantMethod, UnquantizedMethod


def _layer(k: int, n: int, dtype: torch.dtype, packed: bool = False) -> Linear:
    layer = Linear(k, n, dtype=dtype, device="cpu")
    layer.weight.data.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(1)))
    if packed:
        layer.weight = _packed(layer.weight)
        layer.quant_method = PackedCPUMethod()
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_do_not_depend_on_their_batch(dtype):
    packed = dtype == torch.bfloat16 and can_pack(torch.device("cpu"), dtype)
    layer = _layer(1536, 576, dtype, packed)  # an MLP down-projection's shape, where oneDNN splits K for some M
    layer.quant_method = TiledMethod(layer.quant_method, ROW_TILE)
    x = torch.randn(300, 1536, generator=torch.Generator().manual_seed(2)).to(dtype)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(300)])  # one row per call
    for m, offset in ((160, 0), (256, 5), (33, 100), (300, 0)):
        assert torch.equal(layer(x[offset:offset + m]), alone[offset:offset + m])


class _PositionalMethod(QuantMethod):
    """A kernel whose rows 4 and later in a call round differently (as a kernel's ragged block might)."""

    def apply(self, layer, x):
        y = F.linear(x, layer.weight)
        return y + (torch.arange(x.shape[0]) >= 4).to(y.dtype)[:, None] * 1e-3


def test_probe_shrinks_the_tile_until_rows_stop_moving():
    layer = _layer(64, 32, torch.float32)
    assert _choose_tile(layer, UnquantizedMethod(), torch.float32) == ROW_TILE
    assert _choose_tile(layer, _PositionalMethod(), torch.float32) == 4
    layer.quant_method = TiledMethod(_PositionalMethod(), 4)
    x = torch.randn(12, 64)
    assert torch.equal(layer(x)[5:6], layer(x[5:6]))


def test_tied_head_gets_a_tiled_linear_sharing_the_embedding():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.embed_tokens = torch.nn.Embedding(100, 16)
            self.proj = _layer(16, 16, torch.float32)
            self.lm_head = None

    m = Tied()
    counts = make_batch_invariant(m, torch.float32)
    assert sum(counts.values()) == 2
    assert m.lm_head.weight is m.model.embed_tokens.weight
    h = torch.randn(3, 16)
    torch.testing.assert_close(m.lm_head(h), h @ m.model.embed_tokens.weight.T, rtol=0, atol=1e-5)
