"""Speculative decoding through the engine: greedy outputs identical to plain decoding (lookahead,
prompt lookup, batches mixed with non-speculative requests), the sampling distribution kept,
seeded requests reproducible, metrics, and per-request overrides."""

import pytest
import torch

from ember import LLM, SamplingParams
from ember.errors import InvalidRequestError

LOOKAHEAD = dict(speculative_decoding_mode="LOOKAHEAD_DECODING", lookahead_windows_size=3,
                 lookahead_ngram_size=4, lookahead_verification_set_size=3, enable_b10_lookahead=True)
PROMPT_LOOKUP_ONLY = dict(lookahead_windows_size=0, lookahead_verification_set_size=0)
NO_SPEC = dict(lookahead_windows_size=0, lookahead_verification_set_size=0, enable_b10_lookahead=False)


def _greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def _prompts(n, seed=0, vocab=49000):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in torch.randint(4, 30, (n,), generator=g)]
    out.append(out[0][:6] * 4)  # repetitive: prompt lookup has something to find
    return out


@pytest.fixture(scope="module")
def tiny_pair(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32"), LLM(str(tiny_llama_dir), dtype="float32", speculator=LOOKAHEAD)


def test_tiny_greedy_identical_mixed_batch(tiny_pair):
    plain, spec = tiny_pair
    prompts = _prompts(5)
    expected = [o.token_ids for o in plain.generate(prompts, _greedy(32))]
    # per request: full lookahead + prompt lookup, prompt lookup only, lookahead only, none, a penalty
    # (not speculated), and a sampled request sharing the batch
    params = [_greedy(32), _greedy(32, **PROMPT_LOOKUP_ONLY), _greedy(32, enable_b10_lookahead=False),
              _greedy(32, **NO_SPEC), _greedy(32), _greedy(32)]
    outs = spec.generate(prompts + [[7, 8, 9]], params + [SamplingParams(max_tokens=20, temperature=0.9)])
    assert [o.token_ids for o in outs[:len(prompts)]] == expected
    assert sum(o.metrics.num_accepted_tokens for o in outs) > 0
    assert outs[3].metrics.num_draft_tokens == 0
    m = outs[0].metrics
    assert 0 < m.acceptance_rate <= 1 and m.mean_tokens_per_step > 1
    assert spec.engine.core.stats_accepted_tokens > 0


def test_seeded_sampling_reproducible_whatever_the_batch(tiny_pair):
    _, spec = tiny_pair
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=11, ignore_eos=True)
    prompt = [5, 6, 7, 8] * 5
    alone = spec.generate([prompt], p)[0]
    batch = spec.generate([[9, 10], prompt, [11, 12] * 6], [SamplingParams(max_tokens=16, temperature=0.8), p, _greedy(9)])
    assert batch[1].token_ids == alone.token_ids
    assert alone.metrics.num_draft_tokens > 0


def test_override_above_the_engine_maximum_is_refused(tiny_pair):
    _, spec = tiny_pair
    with pytest.raises(InvalidRequestError, match="lookahead_ngram_size=9"):
        spec.generate([[1, 2, 3]], _greedy(4, lookahead_ngram_size=9))


@pytest.fixture(scope="module")
def tiny16_dir(tmp_path_factory, tiny_llama_dir):
    """A tiny Llama over a 16-token vocabulary: every prompt contains every token, so drafts exist."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny16")
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(3)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(d)
    return d


def test_sampling_distribution_is_kept(tiny16_dir):
    """The second output token is the first one verification decides: its marginal over many seeded
    samples matches the exact one computed with transformers (chi-square, 15 degrees of freedom)."""
    from transformers import AutoModelForCausalLM

    prompt = list(range(16)) + [3, 4, 5, 3, 4]
    llm = LLM(str(tiny16_dir), dtype="float32", speculator=LOOKAHEAD, max_batch_size=512)
    num = 1200
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=s, ignore_eos=True) for s in range(num)]
    outs = [o for i in range(0, num, 200) for o in llm.generate([prompt] * 200, params[i:i + 200])]
    counts = torch.zeros(16)
    for o in outs:
        counts[o.token_ids[1]] += 1
    drafted = sum(o.metrics.num_draft_tokens for o in outs)
    accepted = sum(o.metrics.num_accepted_tokens for o in outs)
    assert drafted > num and 0 < accepted < drafted  # speculation ran, with acceptances and rejections

    ref = AutoModelForCausalLM.from_pretrained(tiny16_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        p1 = ref(torch.tensor([prompt])).logits[0, -1].softmax(-1)  # [16]
        batch = torch.tensor([prompt + [a] for a in range(16)])
        p2_given = ref(batch).logits[:, -1].softmax(-1)  # [16 first tokens, 16]
    p2 = (p1[:, None] * p2_given).sum(0)
    chi2 = (((counts - num * p2) ** 2) / (num * p2)).sum().item()
    assert chi2 < 40.0, (counts / num, p2, chi2)  # p-value ~5e-4 at 15 dof


def test_default_model_greedy_identical():
    """SmolLM2-135M in float32: lookahead + prompt lookup, and prompt lookup alone, give plain greedy's tokens."""
    from ember.bench.spec import WORKLOADS

    llm = LLM(dtype="float32", speculator=LOOKAHEAD)
    prompts = [llm.tokenizer.encode(WORKLOADS["code"][2]), llm.tokenizer.encode(WORKLOADS["repeat"][0])]
    plain = llm.generate(prompts, _greedy(32, **NO_SPEC))
    for params in (_greedy(32), _greedy(32, **PROMPT_LOOKUP_ONLY)):
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
        assert sum(o.metrics.num_accepted_tokens for o in outs) > 0


def test_drafts_past_a_stop_are_not_emitted(tiny_pair):
    plain, spec = tiny_pair
    prompt = _prompts(1)[-1]  # repetitive: long accepted drafts
    ref = plain.generate([prompt], _greedy(12))[0].token_ids
    for params in (_greedy(5), SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[ref[3]])):
        out = spec.generate([prompt], params)[0]
        want = plain.generate([prompt], params)[0]
        assert out.token_ids == want.token_ids and out.finish_reason == want.finish_reason
