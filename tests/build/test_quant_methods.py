"""Each weight format on one Linear: quantize -> load the stored tensors -> apply, against the float layer;
the native kernels (int8/int4 packed CPU matmuls, fp8 _scaled_mm) against dequantize-and-matmul."""

from __future__ import annotations

import pytest
import torch

from ember.layers.linear import Linear
from ember.layers.quant import QUANT_METHODS

ERR = {"int8": 0.01, "fp8": 0.05, "int4": 0.12, "fp4": 0.12}


def _pair(name, dtype, bias=False):
    torch.manual_seed(0)
    ref = Linear(128, [64, 32], bias=bias, dtype=dtype)
    ref.weight.data.normal_(0, 0.05)
    if bias:
        ref.bias.data.normal_(0, 0.1)
    x = torch.randn(7, 128, dtype=dtype)
    method = QUANT_METHODS[name](64) if name == "int4" else QUANT_METHODS[name]()
    q = Linear(128, [64, 32], bias=bias, dtype=dtype)
    q.set_quant_method(method, dtype, "cpu")
    for key, t in method.quantize(ref.weight, input_amax=float(x.abs().max())).items():
        param = getattr(q, key)
        assert param.dtype == t.dtype and param.shape == t.shape
        param.data.copy_(t)
    if bias:
        q.bias.data.copy_(ref.bias)
    q.process_weights_after_loading()
    return ref, q, x


@pytest.mark.parametrize("name", list(QUANT_METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_format_matches_float_layer(name, dtype):
    ref, q, x = _pair(name, dtype, bias=QUANT_METHODS[name].supports_bias)
    want, got = ref(x).float(), q(x).float()
    assert ((got - want).norm() / want.norm()).item() < ERR[name] + (0.01 if dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_cpu_kernels_match_dequantize_and_matmul(name):
    ref, q, x = _pair(name, torch.float32, bias=True)
    assert q.quant_method.is_native(torch.device("cpu"))
    if name == "int4":
        assert q.cpu_kernel is not None  # `weight` now holds the kernel's packed layout
        dense = q.quant_method.dequantize_stored(**{
            {"weight": "weight", "weight_scale": "scale", "weight_min": "minimum"}[k]: t
            for k, t in q.quant_method.quantize(ref.weight).items()})  # from the portable layout
    else:
        dense = q.quant_method.dequantize(q)
    want = torch.nn.functional.linear(x, dense, q.bias)
    torch.testing.assert_close(q(x), want, atol=1e-4, rtol=1e-4)


def test_fp8_scaled_mm_path(monkeypatch):
    """The fp8-unit path (torch._scaled_mm with the calibrated input scale), run on CPU where torch has it."""
    from ember.layers.quant.fp8 import Fp8Method

    monkeypatch.setattr(Fp8Method, "is_native", lambda self, device: True)
    ref, q, x = _pair("fp8", torch.bfloat16, bias=True)
    assert q.use_scaled_mm
    got = q(x).float()
    assert q.use_scaled_mm  # did not fall back
    want = ref(x).float()
    assert ((got - want).norm() / want.norm()).item() < 0.08
