"""Grammar backend and sampler hooks: regex / choice / EBNF outputs, rollback, bitmask application on
the batch (constrained and free rows together), speculation masks, reasoning phase."""

import re

import pytest
import torch
from structured_support import EOS, VOCAB

from ember.errors import InvalidRequestError
from ember.structured.backend import GrammarBackend
from ember.structured.bitmask import (advance, allocate_bitmask, apply_bitmask, build_grammar_bitmask,
                                      fill_draft_bitmask, unpack_bitmask)
from ember.structured.spec import StructuredOutputSpec, spec_from_response_format

REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no)", r"[a-z]+@[a-z]+\.(com|org)", r"-?[0-9]+(\.[0-9]{1,2})?",
           r"[A-Z][a-z]{2,6} [A-Z][a-z]{2,6}", r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])"]


@pytest.mark.parametrize("regex", REGEXES)
def test_regex_outputs_fullmatch(regex, backend, walker):
    spec = spec_from_response_format(None, {"regex": regex})
    for seed in range(3):
        text, _ = walker.run(backend.new_matcher(spec), seed=seed, budget=8)
        assert re.fullmatch(regex, text), (regex, text)


def test_choice_outputs_one_of(backend, walker):
    choices = ["positive", "negative", 'say "hi"\n', "naïve \\ back", "x"]
    spec = spec_from_response_format(None, {"choice": choices})
    seen = set()
    for seed in range(12):
        text, _ = walker.run(backend.new_matcher(spec), seed=seed, budget=50)
        assert text in choices
        seen.add(text)
    assert len(seen) > 1


def test_ebnf_grammar_outputs_match(backend, walker):
    grammar = 'root ::= "SELECT " col ("," col)* " FROM " tbl ";"\ncol ::= [a-z]+\ntbl ::= "users" | "orders"'
    spec = spec_from_response_format(None, {"grammar": grammar})
    for seed in range(4):
        text, _ = walker.run(backend.new_matcher(spec), seed=seed, budget=10)
        assert re.fullmatch(r"SELECT [a-z]+(,[a-z]+)* FROM (users|orders);", text), text


def test_rollback_restores_state(backend, walker):
    spec = spec_from_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
        "required": ["a", "b"]}}}, {})
    m = backend.new_matcher(spec)
    _, ids = walker.run(backend.new_matcher(spec), seed=3)
    k = min(6, len(ids) - 1)
    for t in ids[:2]:
        assert m.accept(t)
    before = walker.allowed(m)
    for t in ids[2:2 + k]:
        assert m.accept(t)
    m.rollback(k)
    assert torch.equal(walker.allowed(m), before)
    for t in ids[2:]:  # and the sequence replays to the same end
        assert m.accept(t)
    assert m.is_terminated()
    m.rollback(1)
    assert not m.is_terminated() and m.is_completed()
    with pytest.raises(ValueError):
        m.rollback(10_000)


def test_batch_bitmask_mixes_free_and_constrained_rows(backend):
    spec = spec_from_response_format(None, {"choice": ["alpha", "beta"]})
    matchers = [None, backend.new_matcher(spec), None]
    bitmask, rows = build_grammar_bitmask(matchers, VOCAB)
    assert rows == [1] and bitmask.shape == (3, VOCAB // 32)
    logits = torch.randn(3, VOCAB)
    ref = logits.clone()
    apply_bitmask(logits, bitmask, rows)
    assert torch.equal(logits[0], ref[0]) and torch.equal(logits[2], ref[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all("alpha".startswith(t) or "beta".startswith(t)
                           for t in (backend.decoded_vocab[i].decode() for i in allowed))
    assert build_grammar_bitmask([None, None], VOCAB) is None


def test_apply_bitmask_cpu_kernel_matches_torch_path():
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (4, 3), dtype=torch.int32, generator=gen)
    wide = torch.randn(4, 100, generator=gen)  # logits wider than the bitmask's 96 ids
    a, b = wide.clone(), wide.clone()
    apply_bitmask(a, bitmask, [0, 2])  # xgrammar's CPU kernel
    apply_bitmask(b.t().contiguous().t(), bitmask, [0, 2])  # non-contiguous: the torch path
    bt = b.t().contiguous().t()
    apply_bitmask(bt, bitmask, [0, 2])
    expect = wide.clone()
    allowed = unpack_bitmask(bitmask, 100)
    for r in (0, 2):
        expect[r] = expect[r].masked_fill(~allowed[r], float("-inf"))
    assert torch.equal(a, expect) and torch.equal(bt, expect)
    assert torch.isinf(a[0, 96:]).all() and torch.equal(a[1], wide[1])


def test_advance_reports_termination_and_refusal(backend, walker):
    spec = StructuredOutputSpec(choice=("ok",))
    _, ids = walker.run(backend.new_matcher(spec), seed=0)
    m = backend.new_matcher(spec)
    assert not advance(m, ids[:-1])
    assert advance(m, ids[-1:])  # EOS after a complete output: finish
    m2 = backend.new_matcher(spec)
    assert advance(m2, [EOS])  # refused token: finish rather than emit invalid output


def test_draft_bitmask_rows_match_sequential_masks(backend, walker):
    spec = spec_from_response_format(None, {"regex": r"[0-9]{2}-[a-z]{2}"})
    _, ids = walker.run(backend.new_matcher(spec), seed=1)
    m = backend.new_matcher(spec)
    drafts = ids[:2] + [EOS]  # the third draft is refused by the grammar
    bm = allocate_bitmask(len(drafts) + 1, VOCAB)
    assert fill_draft_bitmask(m, drafts, bm, 0) == 2
    assert m.num_accepted_tokens == 0
    done = backend.new_matcher(spec)  # a draft run past the stop token masks to the stop token again
    assert fill_draft_bitmask(done, ids, allocate_bitmask(len(ids) + 1, VOCAB), 0) == len(ids)
    ref = backend.new_matcher(spec)
    for k in range(3):
        assert torch.equal(unpack_bitmask(bm[k:k + 1], VOCAB)[0], walker.allowed(ref))
        if k < 2:
            ref.accept(drafts[k])
    assert (bm[3] == -1).all()


def test_reasoning_phase_constrains_after_think(backend, walker, tokenizer):
    spec = spec_from_response_format(None, {"choice": ["A", "B"]}, reasoning=True)
    m = backend.new_matcher(spec)
    free = walker.allowed(m)
    assert free.all() and m.is_reasoning
    for t in tokenizer.encode("Let me think: </think>", add_special_tokens=False):
        assert m.accept(t)
    assert not m.is_reasoning
    allowed = walker.allowed(m)
    assert 0 < int(allowed.sum()) < 10
    text, _ = walker.run(m, seed=0)
    assert text in ("A", "B")
    # rolling back into the reasoning reopens it
    m2 = backend.new_matcher(spec)
    ids = tokenizer.encode("hmm </think>", add_special_tokens=False)
    for t in ids:
        m2.accept(t)
    m2.rollback(1)
    assert m2.is_reasoning


def test_logits_wider_than_tokenizer(tokenizer):
    be = GrammarBackend(tokenizer, vocab_size=VOCAB + 64, stop_token_ids=[EOS])
    m = be.new_matcher(StructuredOutputSpec(json_object=True))
    bitmask, rows = build_grammar_bitmask([m], be.vocab_size)
    logits = torch.zeros(1, VOCAB + 64)
    apply_bitmask(logits, bitmask, rows)
    assert torch.isinf(logits[0, VOCAB:]).all()
    assert not m.accept(VOCAB + 10)


def test_compile_error_is_invalid_request(backend):
    with pytest.raises(InvalidRequestError) as e:
        backend.compile(StructuredOutputSpec(grammar='root ::= undefined_rule'))
    assert e.value.param == "grammar" and "undefined_rule" in e.value.message


def _counts(rows: list[list[int]]) -> torch.Tensor:
    counts = torch.zeros(len(rows), VOCAB)  # [N, V]
    for i, ids in enumerate(rows):
        for t in ids:
            counts[i, t] += 1
    return counts


def test_sampler_only_draws_allowed_tokens(backend):
    """The runner hook: mask the batch's logits, then the unchanged Sampler (penalties, top-p, seeds)."""
    from ember.layers.sampler import Sampler, SamplingMetadata

    matchers = [backend.new_matcher(StructuredOutputSpec(regex=r"[0-9]+")), None,
                backend.new_matcher(StructuredOutputSpec(choice=("yes", "no")))]
    bitmask, rows = build_grammar_bitmask(matchers, VOCAB)
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0)) * 5
    apply_bitmask(logits, bitmask, rows)
    gens = [torch.Generator().manual_seed(1), None, None]
    meta = SamplingMetadata(temperatures=torch.tensor([1.0, 1.0, 0.0]), top_ps=torch.tensor([0.9, 0.9, 0.9]),
                            top_ks=None, min_ps=None, presence_penalties=torch.tensor([0.5, 0.5, 0.5]),
                            frequency_penalties=None, repetition_penalties=torch.tensor([1.3, 1.3, 1.3]),
                            output_token_counts=_counts([[5, 6], [5, 6], []]), prompt_token_mask=_counts([[7]] * 3) > 0,
                            banned_token_ids=None,
                            generators=gens, num_logprobs=[None, None, None], is_all_greedy=False,
                            is_all_random=False)
    allowed = unpack_bitmask(bitmask, VOCAB)
    for _ in range(20):
        ids = Sampler()(logits, meta).token_ids.tolist()
        assert allowed[0, ids[0]] and allowed[2, ids[2]]
    assert matchers[0].accept(ids[0]) and matchers[2].accept(ids[2])
