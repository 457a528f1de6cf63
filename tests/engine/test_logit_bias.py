"""logit_bias through the engine (the sampler's batched path and the speculative verifier): a banned token
never appears, a forced token is every token, and a biased request leaves its unbiased neighbours alone."""

import pytest
import torch

from ember import LLM, SamplingParams
from ember.errors import InvalidRequestError

LOOKAHEAD = dict(speculative_decoding_mode="LOOKAHEAD_DECODING", lookahead_windows_size=3,
                 lookahead_ngram_size=4, lookahead_verification_set_size=3, enable_b10_lookahead=True)


def _greedy(max_tokens=12, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49000, (int(k),), generator=g).tolist() for k in torch.randint(4, 20, (n,), generator=g)]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32")


def test_ban_force_and_neighbours(llm):
    prompts = _prompts(3)
    plain = [o.token_ids for o in llm.generate(prompts, _greedy())]
    banned = {t: -100.0 for t in set(plain[0])}  # every token greedy decoding picked
    forced = 4242
    outs = llm.generate(prompts, [_greedy(logit_bias=banned), _greedy(), _greedy(logit_bias={str(forced): 100})])
    assert outs[0].token_ids != plain[0] and not set(outs[0].token_ids) & set(banned)
    assert outs[1].token_ids == plain[1]  # the unbiased request in the same batch is unchanged
    assert outs[2].token_ids == [forced] * 12
    # sampled rows (temperature 1) take the bias too
    sampled = llm.generate([prompts[0]] * 4, SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True, seed=5,
                                                           logit_bias=banned))
    assert not any(set(o.token_ids) & set(banned) for o in sampled)


def test_bad_bias_is_refused(llm):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"x": 1})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(InvalidRequestError, match="logit_bias") as e:
        llm.generate([[5, 6, 7]], _greedy(logit_bias={10**7: 1}))
    assert e.value.param == "logit_bias"


def test_speculative_greedy_identical(tiny_llama_dir, llm):
    spec = LLM(str(tiny_llama_dir), dtype="float32", speculator=LOOKAHEAD)
    prompts = [p[:5] * 4 for p in _prompts(3, seed=1)]  # repetitive: prompt lookup drafts
    plain = [o.token_ids for o in llm.generate(prompts, _greedy(24))]
    # ban what greedy decoding picked, and nudge the prompt's tokens: drafts meet a changed argmax
    bias = {t: 2.0 for t in prompts[0]} | {t: -100.0 for t in plain[0]}
    params = [_greedy(24, logit_bias=bias), _greedy(24), _greedy(24, logit_bias={t: 2.0 for t in prompts[2][:3]})]
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    outs = spec.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    assert expected[0] != plain[0]  # the bias mattered
    assert all(o.metrics.num_draft_tokens > 0 for o in outs)
