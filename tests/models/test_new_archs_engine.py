"""Gemma 3 (text and vision-language checkpoints) and the MoE models through the batched engine: float32 greedy
tokens of a mixed batch (chunked prefill, prefix-cached repeat) equal transformers' generate."""

import logging
import shutil

import pytest
import torch

from ember import LLM, SamplingParams
from models_support import load_hf


@pytest.mark.parametrize("name", ["gemma3", "gemma3_vl", "mixtral", "qwen3_moe"])
def test_engine_greedy_matches_transformers(name, checkpoints, tiny_llama_dir, tmp_path, caplog):
    path = tmp_path / name  # the checkpoint with a tokenizer (the engine loads one; its ids are all we use)
    shutil.copytree(checkpoints[name], path)
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    with caplog.at_level(logging.INFO, logger="ember"):
        llm = LLM(str(path), dtype="float32", max_num_tokens=8, block_size=4)
    assert ("vision tower ignored" in caplog.text) == (name == "gemma3_vl")
    prompts = [[5, 17, 90, 33, 4, 8, 9, 10, 11, 12, 13], [7, 7, 120], [5, 17, 90, 33, 4, 8, 9, 10, 11, 12, 14]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    hf = load_hf(str(path), torch.float32)
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            r = hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        assert o.token_ids == r[0, len(p):].tolist()
    again = llm.generate([prompts[0]], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    assert again.metrics.num_cached_tokens > 0 and again.token_ids == outs[0].token_ids  # the prefix cache's copy
