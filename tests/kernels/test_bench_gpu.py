"""`ember bench gpu` runs end to end on CPU with the tiny architecture (no timing is asserted)."""

from __future__ import annotations

import argparse

import torch

from ember.bench import gpu


def test_bench_gpu_tiny_on_cpu(capsys):
    p = argparse.ArgumentParser()
    gpu.add_args(p)
    args = p.parse_args(["--arch", "tiny", "--device", "cpu", "--batch-sizes", "1,3", "--input-len", "6",
                         "--output-len", "3", "--prefill-batch", "2", "--prefill-len", "10"])
    res = gpu.main(args)
    assert [r["batch"] for r in res["decode"]] == [1, 3]
    assert all(r["decode_tok_s"] > 0 and "hf_decode_tok_s" in r for r in res["decode"])
    assert res["decode"][0]["greedy_prefix_match"] == 3  # same weights, same greedy tokens as transformers
    assert res["prefill"]["ember_tok_s"] > 0 and res["copy_bandwidth_gbs"] > 0
    assert "ember decode tok/s" in capsys.readouterr().out


def test_published_configs():
    cfg = gpu.make_config("llama-3-8b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (4096, 32, 32, 8, 14336, 128256)
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["rope_theta"] == 500000.0
    cfg = gpu.make_config("qwen3-8b")
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (36, 12288, 151936, 128)
    with torch.device("meta"):  # the full-size model builds (no memory on the meta device)
        from ember.models.registry import get_model_class

        model = get_model_class("LlamaForCausalLM")(gpu.make_config("llama-3-8b"), dtype=torch.bfloat16, device="meta")
    assert 7.9e9 < sum(p.numel() for p in model.parameters()) < 8.1e9
