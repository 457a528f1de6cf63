"""Sampler against independent references: argmax, the analytic distribution, hand-computed penalties."""

from types import SimpleNamespace

import torch

from ember.layers.sampler import Sampler
from ember.sampling_params import SamplingParams
from ember.worker.sampling_inputs import SamplingState

V = 50


def _req(rid, params, outputs=(), prompt=(1, 2, 3), eos=(0,)):
    return SimpleNamespace(request_id=rid, sampling_params=params, output_token_ids=list(outputs),
                           prompt_token_ids=list(prompt), eos_token_ids=list(eos))


def _metadata(reqs, state=None):
    """The runner's path: each request written into a persistent row once, then the rows gathered."""
    state = state if state is not None else SamplingState(V, torch.device("cpu"))
    rows = []
    for r in reqs:
        if r.request_id not in state.request_ids:
            row = state.request_ids.index(None) if None in state.request_ids else state.capacity
            state.add(row, r.request_id, r.sampling_params, r.eos_token_ids, r.prompt_token_ids, r.output_token_ids)
        rows.append(state.request_ids.index(r.request_id))
    return state.metadata(rows)


def _sample(logits, reqs, state=None):
    return Sampler()(logits, _metadata(reqs, state))


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    out = _sample(logits, [_req(str(i), SamplingParams(temperature=0)) for i in range(4)])
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_k_one_is_greedy_even_with_temperature():
    torch.manual_seed(1)
    logits = torch.randn(3, V)
    out = _sample(logits, [_req(str(i), SamplingParams(temperature=1.5, top_k=1)) for i in range(3)])
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_mixed_greedy_and_random_rows():
    torch.manual_seed(2)
    logits = torch.randn(2, V)
    out = _sample(logits, [_req("g", SamplingParams(temperature=0)), _req("r", SamplingParams(temperature=1.0, seed=3))])
    assert out.token_ids[0].item() == logits[0].argmax().item()


def test_sampling_follows_the_distribution():
    torch.manual_seed(3)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    logits = torch.log(probs.clamp_min(1e-30))
    n = 4000
    reqs = [_req(str(i), SamplingParams(temperature=1.0)) for i in range(n)]
    out = _sample(logits.expand(n, V).clone(), reqs)
    freq = torch.bincount(out.token_ids, minlength=V).float() / n
    assert torch.allclose(freq[:4], probs[:4], atol=0.03)
    assert freq[4:].sum() == 0


def test_temperature_sharpens():
    logits = torch.log(torch.tensor([0.6, 0.4] + [1e-9] * (V - 2))).expand(4000, V).clone()
    reqs = [_req(str(i), SamplingParams(temperature=0.5)) for i in range(4000)]
    freq = torch.bincount(_sample(logits, reqs).token_ids, minlength=V).float() / 4000
    expected = 0.6**2 / (0.6**2 + 0.4**2)
    assert abs(freq[0].item() - expected) < 0.03


def test_top_p_and_min_p_cut_the_tail():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    logits = torch.log(probs.clamp_min(1e-30)).expand(2000, V).clone()
    top_p = _sample(logits, [_req(str(i), SamplingParams(temperature=1.0, top_p=0.8)) for i in range(2000)]).token_ids
    assert set(top_p.tolist()) <= {0, 1}
    min_p = _sample(logits, [_req(str(i), SamplingParams(temperature=1.0, min_p=0.25)) for i in range(2000)]).token_ids
    assert set(min_p.tolist()) <= {0, 1, 2}  # 0.15 >= 0.25 * 0.5, 0.05 is not


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(4)
    row = torch.randn(V)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [_sample(row[None].clone(), [_req("a", p)]).token_ids.item() for _ in range(1)]
    state_a = SamplingState(V, torch.device("cpu"))
    seq_alone = [_sample(row[None].clone(), [_req("a", p)], state_a).token_ids.item() for _ in range(8)]
    state_b = SamplingState(V, torch.device("cpu"))
    seq_batched = []
    for step in range(8):
        others = torch.randn(5, V)
        logits = torch.cat([others[:2], row[None], others[2:]])
        reqs = [_req(f"o{step}{i}", SamplingParams(temperature=0.7)) for i in range(2)] + [_req("a", p)] + \
               [_req(f"q{step}{i}", SamplingParams(temperature=1.0, seed=step)) for i in range(3)]
        seq_batched.append(_sample(logits, reqs, state_b).token_ids[2].item())
    assert seq_alone == seq_batched
    assert alone[0] == seq_alone[0]


def test_penalties_match_formulas():
    torch.manual_seed(5)
    logits = torch.randn(1, V)
    outputs = [7, 7, 9]
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3)
    req = _req("a", params, outputs=outputs, prompt=[3])
    meta = _metadata([req])
    from ember.layers.sampler import apply_penalties

    got = apply_penalties(logits.clone(), meta)[0]
    exp = logits[0].clone()
    for t, c in ((7, 2), (9, 1)):
        exp[t] -= 0.25 * c + 0.5
    for t in (3, 7, 9):
        exp[t] = exp[t] / 1.3 if exp[t] > 0 else exp[t] * 1.3
    assert torch.allclose(got, exp, atol=1e-6)


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, 0] = 10.0  # eos is the clear favourite
    logits[0, 5] = 9.0
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5])
    out = _sample(logits, [_req("a", params, outputs=[1])])
    assert out.token_ids.item() not in (0, 5)
    out = _sample(logits, [_req("a", params, outputs=[1, 2, 3])])
    assert out.token_ids.item() == 0


def test_logprobs_are_the_raw_model_distribution():
    torch.manual_seed(6)
    logits = torch.randn(2, V)
    reqs = [_req("a", SamplingParams(temperature=0, logprobs=3)), _req("b", SamplingParams(temperature=0))]
    out = _sample(logits, reqs)
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    vals, ids = out.top_logprobs
    assert ids[0].tolist() == ref[0].topk(3).indices.tolist()
    assert torch.allclose(vals[0], ref[0].topk(3).values)


def test_penalty_counts_are_kept_incrementally():
    """Counts updated token by token (as the runner does with each step's new tokens) equal counts of the
    whole history, and a freed row's counts never leak into the next request that takes it."""
    torch.manual_seed(7)
    logits = torch.randn(1, V)
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3)
    state = SamplingState(V, torch.device("cpu"))
    state.add(0, "a", params, [0], [3], [7])
    for t in (7, 9):
        state.append_tokens(0, [t])
    from ember.layers.sampler import apply_penalties

    incremental = apply_penalties(logits.clone(), state.metadata([0]))
    whole = apply_penalties(logits.clone(), _metadata([_req("a", params, outputs=[7, 7, 9], prompt=[3])]))
    assert torch.equal(incremental, whole)
    state.remove(0, is_finished=True)
    state.add(0, "b", params, [0], [4], [])
    fresh = apply_penalties(logits.clone(), state.metadata([0]))
    assert torch.equal(fresh, apply_penalties(logits.clone(), _metadata([_req("b", params, prompt=[4])])))
    assert not torch.equal(fresh, incremental)
