"""Packed bf16 CPU linears: bit-identical to F.linear, batch-invariant per row, and the whole model
gives the same logits packed or not."""

import pytest
import torch
import torch.nn.functional as F

from ember.layers.cpu_pack import can_pack, pack_model_for_cpu
from ember.layers.linear import Linear

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16),
                                reason="this CPU has no oneDNN bf16 support")


def test_packed_linear_is_bit_identical_and_row_invariant():
    torch.manual_seed(0)
    lin = Linear(64, [96, 32], bias=True, dtype=torch.bfloat16)
    lin.weight.data.normal_()
    lin.bias.data.normal_()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    holder = torch.nn.Module()
    holder.proj = lin
    assert pack_model_for_cpu(holder) == 1
    x = torch.randn(17, 64).bfloat16()
    full = lin(x)
    assert torch.equal(full, F.linear(x, w, b))
    assert all(torch.equal(full[i:i + 1], lin(x[i:i + 1])) for i in range(17))


def test_fp32_layers_are_left_alone():
    holder = torch.nn.Module()
    holder.proj = Linear(8, 8, dtype=torch.float32)
    assert pack_model_for_cpu(holder) == 0


def test_model_logits_unchanged_by_packing(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ember.layers.attention import build_attention_metadata
    from ember.models.registry import get_model_class
    from ember.worker.kv_cache import allocate_kv_caches

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    state = LlamaForCausalLM(cfg).state_dict()
    outs = []
    for pack in (False, True):
        model = get_model_class("LlamaForCausalLM")(cfg, dtype=torch.bfloat16)
        model.load_weights(state.items())
        if pack:
            assert pack_model_for_cpu(model) == 2 * 4 + 1  # four matmuls a layer + the tied head
        caches = allocate_kv_caches(2, 4, 16, 2, 16, torch.bfloat16, "cpu")
        ids = torch.arange(10)
        meta = build_attention_metadata([10], [10], [[0]], 16, "cpu")
        with torch.inference_mode():
            outs.append(model.compute_logits(model(ids, torch.arange(10), caches, meta)))
    assert torch.equal(outs[0], outs[1])
