"""Architecture registry and checkpoint-loading errors."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from models_support import load_ours
from ember.models.registry import SUPPORTED_ARCHITECTURES, get_model_class


def test_registry_lists_supported_on_unknown():
    assert len(SUPPORTED_ARCHITECTURES) == 10
    for arch in SUPPORTED_ARCHITECTURES:
        assert get_model_class(arch).__name__ == arch
    with pytest.raises(ValueError, match="unsupported architecture 'FalconForCausalLM'.*LlamaForCausalLM.*Phi3"):
        get_model_class("FalconForCausalLM")


def _fresh(path):
    cfg = transformers.AutoConfig.from_pretrained(path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    return get_model_class(cfg.architectures[0])(cfg, dtype=torch.float32, device="cpu"), weights


def test_missing_and_unexpected_tensors_are_named(checkpoints):
    model, weights = _fresh(checkpoints["llama"])
    del weights["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.self_attn\.qkv_proj\.weight\[shard 1\]"):
        model.load_weights(weights.items())
    model, weights = _fresh(checkpoints["llama"])
    weights["model.layers.0.mystery.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.0\.mystery\.weight"):
        model.load_weights(weights.items())
    model, weights = _fresh(checkpoints["llama"])
    weights["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape"):
        model.load_weights(weights.items())


def test_tied_embeddings_and_dtype_cast(checkpoints):
    model, weights = _fresh(checkpoints["qwen2"])
    assert model.lm_head is None
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()  # some tied checkpoints store it
    model.load_weights((k, v.to(torch.float16)) for k, v in weights.items())
    assert model.model.embed_tokens.weight.dtype == torch.float32
    ours = load_ours(checkpoints["gemma2"], torch.bfloat16)
    assert ours.kv_cache_spec.num_layers == 2 and ours.head_dim == 16 and ours.num_kv_heads == 2
