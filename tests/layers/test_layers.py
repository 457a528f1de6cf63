"""Small layers: rotary variants vs transformers, norms, activations, linear shards."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ember.layers.activation import GeluAndMul, SiluAndMul
from ember.layers.linear import Linear
from ember.layers.norm import RMSNorm
from ember.layers.rotary import apply_rotary, get_rope


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
])
def test_rotary_matches_hf(rope):
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=128,
                                   rope_parameters=dict(rope))
    inv_freq, attn_scale = ROPE_INIT_FUNCTIONS.get(rope["rope_type"], None)(cfg, "cpu") \
        if rope["rope_type"] != "default" else (1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32)), 1.0)
    pos = torch.tensor([0, 3, 17, 100])
    emb = torch.cat([torch.outer(pos.float(), inv_freq)] * 2, -1)
    x = torch.randn(4, 3, 32)
    ref = x * (emb.cos() * attn_scale)[:, None] + _rotate_half(x) * (emb.sin() * attn_scale)[:, None]
    rot = get_rope(cfg, 32, dtype=torch.float32, device="cpu")
    cos, sin = rot.cos_sin(pos)
    torch.testing.assert_close(apply_rotary(x, cos, sin), ref, atol=1e-5, rtol=1e-5)


def test_rotary_partial_passes_tail_through():
    cfg = transformers.Phi3Config(hidden_size=64, num_attention_heads=2, max_position_embeddings=64,
                                  partial_rotary_factor=0.5)
    rot = get_rope(cfg, 32, dtype=torch.float32, device="cpu")
    x = torch.randn(5, 2, 32)
    out = apply_rotary(x, *rot.cos_sin(torch.arange(5)))
    assert torch.equal(out[..., 16:], x[..., 16:]) and not torch.allclose(out[1:, :, :16], x[1:, :, :16])


def test_unsupported_rope_type():
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2,
                                   rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type"):
        get_rope(cfg, 32, dtype=torch.float32, device="cpu")


def test_rmsnorm_fused_residual_and_gemma_offset():
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    w = torch.randn(8)
    n = RMSNorm(8, 1e-6)
    n.load_weight("weight", w)
    out, res = n(x, r)
    s = x + r
    torch.testing.assert_close(res, s)
    torch.testing.assert_close(out, s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * w)
    g = RMSNorm(8, 1e-6, weight_offset=1.0, dtype=torch.bfloat16)
    g.load_weight("weight", w.bfloat16())
    ref = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w.bfloat16().float())).bfloat16()
    torch.testing.assert_close(g(x.bfloat16()), ref)


def test_gated_activations():
    x = torch.randn(3, 10)
    torch.testing.assert_close(SiluAndMul()(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])
    torch.testing.assert_close(GeluAndMul("tanh")(x),
                               torch.nn.functional.gelu(x[:, :5], approximate="tanh") * x[:, 5:])


def test_linear_shards_and_shape_errors():
    lin = Linear(4, [3, 2], bias=True)
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    lin.load_weight("weight", a, 0)
    lin.load_weight("weight", b, 1)
    lin.load_weight("bias", torch.zeros(5), None)
    x = torch.randn(2, 4)
    torch.testing.assert_close(lin(x), x @ torch.cat([a, b]).T)
    with pytest.raises(ValueError, match="shape mismatch"):
        lin.load_weight("weight", torch.randn(3, 5), 0)
