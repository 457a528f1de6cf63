"""ember.deterministic through the engine: greedy tokens and logprobs bit-identical in bf16 whether a request runs
alone or in a batch with chunked prefill and prefix-cache hits, and the same greedy tokens as the default
attention in float32 (the invariant path computes the same attention). The bf16 rows that the default paths
round differently are shown in tests/layers/test_invariant_attention.py."""

from __future__ import annotations

import random

from ember import LLM, SamplingParams


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    shared = [rng.randrange(3, 49000) for _ in range(20)]  # a common prefix: later prompts hit the prefix cache
    return [(shared if i % 2 else []) + [rng.randrange(3, 49000) for _ in range(rng.randrange(5, 40))]
            for i in range(8)]


def _run(path, dtype, deterministic, alone: int = 0):
    llm = LLM(str(path), dtype=dtype, device="cpu", deterministic=deterministic, max_num_tokens=48)
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=1, ignore_eos=True)
    try:
        batch = llm.generate(_prompts(), params)  # 48-token steps: prompts chunked, decodes beside prefills
        singles = [llm.generate([p], params)[0] for p in _prompts()[:alone]]
        return batch, singles
    finally:
        llm.engine.shutdown()


def _logprobs(out) -> list[float]:
    return [lp.logprob for lp in out.outputs[0].logprobs]


def test_bf16_alone_equals_batched(tiny_llama_dir):
    batch, singles = _run(tiny_llama_dir, "bfloat16", True, alone=4)
    for alone, b in zip(singles, batch):
        assert alone.token_ids == b.token_ids
        assert _logprobs(alone) == _logprobs(b)


def test_float32_same_tokens_as_default(tiny_llama_dir):
    det, _ = _run(tiny_llama_dir, "float32", True)
    default, _ = _run(tiny_llama_dir, "float32", False)
    assert [o.token_ids for o in det] == [o.token_ids for o in default]
