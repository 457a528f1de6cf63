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


def _teacher_forced(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), dim=-1)  # [P, V]


def _check_prompt_logprobs(out, ref: torch.Tensor, ids: list[int], k: int) -> None:
    lps = out.prompt_logprobs
    assert len(lps) == len(ids) and lps[0] is None
    for p in range(1, len(ids)):
        e = lps[p]
        assert e.token_id == ids[p] and abs(e.logprob - ref[p - 1, ids[p]].item()) < 1e-3
        want = ref[p - 1].topk(k)
        assert [t for t, _ in e.top] == want.indices.tolist()
        assert max(abs(v - w) for (_, v), w in zip(e.top, want.values.tolist())) < 1e-3


def test_prompt_logprobs_match_transformers(llm, hf_model):
    """Teacher-forced prompt logprobs from the prefill itself, whole and in 8-token chunks, with a prefix-cache
    hit available (prompt_logprobs requests bypass it) and a request without prompt logprobs in the batch."""
    prompts = [CHAT.format(q) for q in QUESTIONS[:2]]
    ids = [llm.tokenizer.encode(p) for p in prompts]
    refs = [_teacher_forced(hf_model, i) for i in ids]
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    llm.generate(prompts, SamplingParams(max_tokens=1))  # caches both prompts' blocks
    outs = llm.generate(prompts + [prompts[0]], [params, params, SamplingParams(max_tokens=2, temperature=0)])
    assert outs[2].prompt_logprobs is None and outs[2].token_ids == outs[0].token_ids
    for out, i, ref in zip(outs, ids, refs):
        _check_prompt_logprobs(out, ref, i, 3)
    chunked = LLM(dtype="float32", max_num_tokens=8)  # 2-3 chunks per prompt
    for out, i, ref in zip(chunked.generate(prompts, params), ids, refs):
        _check_prompt_logprobs(out, ref, i, 3)
