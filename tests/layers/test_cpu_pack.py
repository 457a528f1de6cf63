"""bf16 CPU linears re-laid at load: on AMX tiles where the CPU has them (close to F.linear, every row
batch-invariant), oneDNN-packed elsewhere (bit-identical to F.linear); the whole model's logits match."""

import pytest
import torch
import torch.nn.functional as F

from ember.layers import cpu_kernels
from ember.layers.cpu_pack import AMXMethod, PackedCPUMethod, can_pack, pack_model_for_cpu
from ember.layers.linear import Linear

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16),
                                reason="this CPU has no oneDNN bf16 support")


def _relaid(out_f: int, in_f: int, amx: bool, monkeypatch):
    if not amx:
        monkeypatch.setattr("ember.layers.cpu_pack.can_tile", lambda w: False)
    torch.manual_seed(0)
    lin = Linear(in_f, out_f, bias=True, dtype=torch.bfloat16)
    lin.weight.data.normal_(std=in_f ** -0.5)
    lin.bias.data.normal_()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    holder = torch.nn.Module()
    holder.proj = lin
    assert pack_model_for_cpu(holder) == 1
    assert isinstance(lin.quant_method, AMXMethod if amx else PackedCPUMethod)
    return lin, w, b


def test_packed_linear_is_bit_identical_and_row_invariant(monkeypatch):
    lin, w, b = _relaid(128, 64, amx=False, monkeypatch=monkeypatch)
    x = torch.randn(17, 64).bfloat16()
    full = lin(x)
    assert torch.equal(full, F.linear(x, w, b))
    assert all(torch.equal(full[i:i + 1], lin(x[i:i + 1])) for i in range(17))


@pytest.mark.skipif(not cpu_kernels.amx_available(), reason="this CPU (or its kernel) gives no AMX")
def test_amx_linear_is_as_close_as_f_linear_and_row_invariant(monkeypatch):
    lin, w, b = _relaid(1728, 576, amx=True, monkeypatch=monkeypatch)
    x = torch.randn(3, 40, 576).bfloat16()  # leading dims are kept
    full = lin(x)
    want = x.double() @ w.double().t() + b.double()
    ref_err = (F.linear(x, w, b).double() - want).abs().max()
    assert full.shape == (3, 40, 1728)
    assert (full.double() - want).abs().max() <= 2 * ref_err  # both round the same fp32 sums to bf16
    flat = x.reshape(-1, 576)
    assert all(torch.equal(full.reshape(-1, 1728)[i:i + 1], lin(flat[i:i + 1])) for i in range(0, 120, 7))


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
    torch.testing.assert_close(outs[0], outs[1], rtol=0.02, atol=0.02)  # AMX tiles round as oneDNN's GEMM, nearly
