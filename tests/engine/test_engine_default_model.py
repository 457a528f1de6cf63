"""The default model (SmolLM2-135M-Instruct, GGUF Q4_1) through the whole engine: greedy float32 output
identical to transformers on the same dequantized weights, batch invariance, and a coherent answer."""

import pytest
import torch

from ember import LLM, SamplingParams

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
             "Explain gravity in one sentence."]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def hf_model(llm):
    from ember.bench.offline import build_hf_model

    return build_hf_model(llm)


def test_greedy_64_tokens_match_transformers(llm, hf_model):
    prompts = [CHAT.format(q) for q in QUESTIONS[:2]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=None)
        assert out.token_ids == ref[0, len(ids):].tolist()


def test_batched_equals_alone_with_shared_prefixes(llm):
    prompts = [CHAT.format(q) for q in QUESTIONS] * 4  # repeats: prefix-cache hits
    params = SamplingParams(max_tokens=24, temperature=0)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts[:4]]
    batch = llm.generate(prompts, params)
    assert [o.token_ids for o in batch] == alone * 4
    assert sum(o.num_cached_tokens for o in batch) > 0


def test_chat_answers_coherently(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
