"""The engine end to end on CPU: batch invariance under chunked prefill, prefix hits and preemption,
agreement with transformers, sampling controls, and refusals."""

import pytest
import torch

from ember import LLM, SamplingParams
from ember.errors import ContextLengthExceededError


def _prompts(n, seed=0, lo=4, hi=40, vocab=49000):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    shared = torch.randint(3, vocab, (33,), generator=g).tolist()  # a common prefix: prefix-cache hits
    out = []
    for i, n_tok in enumerate(lens):
        body = torch.randint(3, vocab, (n_tok,), generator=g).tolist()
        out.append(shared + body if i % 2 == 0 else body)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32")


def test_greedy_matches_transformers(tiny, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompts = _prompts(3, seed=1)
    outs = tiny.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            r = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None)
        assert o.token_ids == r[0, len(p):].tolist()


def test_batch_invariance_with_chunking_prefix_hits_and_preemption(tiny_llama_dir):
    prompts = _prompts(64, seed=2)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    alone = LLM(str(tiny_llama_dir), dtype="float32")
    expected = [alone.generate([p], params)[0].token_ids for p in prompts[:8]]
    # a small token budget forces chunked prefill; a small KV budget forces preemption
    busy = LLM(str(tiny_llama_dir), dtype="float32", max_num_tokens=64, enable_chunked_context=True,
               batch_scheduler_policy="max_utilization", kv_cache_memory_bytes=40 * 2 * 2 * 16 * 2 * 16 * 4)
    outs = busy.generate(prompts, params)
    assert [o.token_ids for o in outs[:8]] == expected
    for p, o in zip(prompts[8:16], outs[8:16]):
        assert o.token_ids == alone.generate([p], params)[0].token_ids
    assert sum(o.metrics.num_cached_tokens for o in outs) > 0  # prefix hits happened


def test_seed_is_reproducible_whatever_the_batch(tiny):
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    a = tiny.generate([[5, 6, 7, 8]], p)[0].token_ids
    batch = tiny.generate([[9, 10], [5, 6, 7, 8], [11, 12, 13]],
                          [SamplingParams(max_tokens=12, temperature=0.8, ignore_eos=True), p,
                           SamplingParams(max_tokens=5, temperature=1.0, seed=1, ignore_eos=True)])
    assert batch[1].token_ids == a


def test_n_stop_tokens_and_lengths(tiny):
    outs = tiny.generate([[5, 6, 7]], SamplingParams(n=3, max_tokens=7, temperature=1.0, seed=3, ignore_eos=True))
    assert len(outs[0].outputs) == 3
    assert all(len(c.token_ids) == 7 and c.finish_reason == "length" for c in outs[0].outputs)
    greedy = tiny.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].token_ids
    stop_at = greedy[4]
    out = tiny.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at],
                                                   ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_at
    assert len(out.token_ids) == greedy.index(stop_at) + 1


def test_stop_string_truncates_text(tiny):
    prompt = tiny.tokenizer.encode("The quick brown fox")
    full = tiny.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    out = tiny.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and stop not in out.text
    assert full.text.startswith(out.text) and out.text == full.text[: full.text.find(stop)]


def test_logprobs(tiny):
    out = tiny.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, logprobs=2, ignore_eos=True))[0]
    lp = out.outputs[0].logprobs
    assert len(lp) == 4 and all(x.token_id == t for x, t in zip(lp, out.token_ids))
    assert all(x.top[0][0] == x.token_id and abs(x.top[0][1] - x.logprob) < 1e-5 for x in lp)  # greedy = top-1


def test_requests_that_can_never_fit_are_refused(tiny):
    with pytest.raises(ContextLengthExceededError):
        tiny.generate([[5] * 500], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError):
        tiny.generate([[10**9]], SamplingParams(max_tokens=2))
