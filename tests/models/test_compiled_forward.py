"""The compiled CPU forward (ember.compile): torch.compile over the layers with paged attention opaque.
float32 greedy output through the engine stays identical to transformers and to the eager engine, over
prefill, batched decode and single-token decode (the two compiled graphs)."""

import pytest
import torch

from ember import LLM, SamplingParams


def test_compiled_engine_greedy_matches_transformers_and_eager(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    compiled = LLM(str(tiny_llama_dir), dtype="float32", compile=True)
    if compiled.engine.runner.compiled is None:
        pytest.fail("the compiled forward did not build (see the warning in the log)")
    prompts = [[5, 17, 900, 33, 4], [7, 7, 1200], [40000, 12, 13, 14, 15, 16, 17]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = compiled.generate(prompts, params)  # mixed prefill + batched decode: the many-token graph
    alone = compiled.generate([prompts[1]], params)[0].token_ids  # batch-1 decode: the one-token graph
    eager = LLM(str(tiny_llama_dir), dtype="float32")
    assert [o.token_ids for o in outs] == [o.token_ids for o in eager.generate(prompts, params)]
    assert alone == outs[1].token_ids
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            r = ref.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None)
        assert o.token_ids == r[0, len(p):].tolist()
