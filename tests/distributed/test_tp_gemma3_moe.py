"""Gemma 3 and the mixture-of-experts models at tensor_parallel_count 2 (two gloo ranks on the CPU): 32 float32
greedy tokens through the batched engine (chunked prefill, prefix caching) equal transformers' generate (which the
TP 1 engine matches: tests/models/test_new_archs_engine.py); the experts split by their intermediate dimension, or
by expert (build.moe_expert_parallel_option). A repeated prompt is served from the prefix cache, unchanged."""

from __future__ import annotations

import pytest
import torch
import transformers

from ember import LLM, SamplingParams
from ember.distributed.parallel import ParallelContext
from ember.layers.moe import expert_shard

# two prompts sharing a 9-token prefix (longer than Gemma 3's sliding window of 6) and a short one
PROMPTS = [[5, 17, 90, 33, 4, 8, 9, 10, 11, 12, 13], [7, 7, 120], [5, 17, 90, 33, 4, 8, 9, 10, 11, 12, 14]]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def _transformers_greedy(path, prompts) -> list[list[int]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            r = hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
            out.append(r[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("arch,ep", [("Gemma3ForCausalLM", -1), ("MixtralForCausalLM", -1),
                                     ("Qwen3MoeForCausalLM", -1), ("Qwen3MoeForCausalLM", 2)])
def test_tp2_matches_transformers_and_reuses_the_prefix_cache(tiny_checkpoints, arch, ep):
    path = tiny_checkpoints[arch]
    llm = LLM(str(path), tensor_parallel_count=2, moe_expert_parallel_option=ep, device="cpu", dtype="float32",
              max_num_tokens=8, block_size=4)
    try:
        tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        again = llm.generate([PROMPTS[0]], GREEDY)[0]
        moe = llm.engine.core.runner.model.model.layers[0].mlp
        if ep > 1:  # rank 0 holds the first half of the experts, whole
            assert list(moe.experts) == ["0", "1"] and moe.experts["0"].down_proj.in_features == 32
        elif arch != "Gemma3ForCausalLM":  # every expert, half of its intermediate dimension
            assert len(moe.experts) == 4 and moe.experts["0"].down_proj.in_features == moe.intermediate_size // 2
    finally:
        llm.engine.shutdown()
    assert tokens == _transformers_greedy(path, PROMPTS)
    assert again.metrics.num_cached_tokens > 0 and again.token_ids == tokens[0]


def test_expert_parallel_needs_a_divisor_of_the_experts():
    held, inner = expert_shard(ParallelContext(rank=3, world_size=4, expert_parallel_size=2), 6)
    assert list(held) == [3, 4, 5] and (inner.rank, inner.world_size) == (1, 2)
    with pytest.raises(ValueError, match="moe_expert_parallel_option: 3 does not divide the model's 4 experts"):
        expert_shard(ParallelContext(rank=0, world_size=3, expert_parallel_size=3), 4)
