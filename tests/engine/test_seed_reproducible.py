"""A seeded request sent twice to an idle engine gives the same completion, in bf16 with the prefix cache on:
the second run computes only the prompt's tail after the cached blocks, and the attention backend computes
that tail the same way when the whole prompt is new (ember.layers.attention: the tail after the last full block
is its own attention call). The logprobs are compared bit for bit: they show any difference in the logits,
not just one large enough to move a sampled token."""

from __future__ import annotations

import random

from ember import LLM, SamplingParams


def test_seeded_pairs_identical_with_prefix_cache(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="bfloat16", device="cpu", enable_prefix_caching=True)
    rng = random.Random(0)
    try:
        for i in range(20):
            # lengths around block boundaries (block 16): 17 and 33 leave a 1-token tail, 32 a full-block one
            n = [17, 33, 32, 47, 40][i % 5] + 16 * (i // 5) % 48
            prompt = [rng.randrange(3, 49000) for _ in range(n)]
            params = SamplingParams(max_tokens=3, temperature=1.0, seed=1000 + i, logprobs=1, ignore_eos=True)
            first, second = (llm.generate([prompt], params)[0] for _ in range(2))
            assert second.num_cached_tokens > 0, "the second request did not hit the prefix cache"
            assert second.token_ids == first.token_ids, (i, n)
            assert [lp.logprob for lp in second.outputs[0].logprobs] == [lp.logprob for lp in first.outputs[0].logprobs], (i, n)
    finally:
        llm.engine.shutdown()


def test_seeded_pairs_identical_on_the_default_model_with_long_prompts():
    """At the default model's shapes oneDNN rounds some rows of a bf16 matmul differently once a call has 160 or
    256 rows (it splits the reduction across threads), so prompts of 200-250 tokens repeated only because the
    prompt's tail runs in matmul calls of its own (ember.layers.row_groups)."""
    llm = LLM(None, dtype="bfloat16", device="cpu", enable_prefix_caching=True)
    rng = random.Random(3)
    try:
        for i, n in enumerate((208, 217, 235, 244)):  # lengths whose pairs differed before the tails were grouped
            prompt = [rng.randrange(3, 49000) for _ in range(n)]
            params = SamplingParams(max_tokens=4, temperature=1.0, seed=7 + i, logprobs=1, ignore_eos=True)
            first, second = (llm.generate([prompt], params)[0] for _ in range(2))
            assert second.num_cached_tokens > 0
            assert second.token_ids == first.token_ids, n
            assert [lp.logprob for lp in second.outputs[0].logprobs] == [lp.logprob for lp in first.outputs[0].logprobs], n
    finally:
        llm.engine.shutdown()
