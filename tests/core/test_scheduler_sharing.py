"""Scheduler: prefix sharing (n > 1, later requests, cache_salt), speculative tokens and their
rollback, and a randomized run of everything together with invariants checked every step."""

import random

import pytest
from core_fakes import FakeRunner, check_invariants, drive, make_req, make_sched, next_token, reference_outputs


def test_same_prompt_added_together_shares_full_blocks():
    sched, runner = make_sched(), FakeRunner(4)
    prompt = list(range(1, 19))  # 18 tokens: 4 full blocks
    a, b, c = (make_req(rid, prompt, max_tokens=4) for rid in "abc")
    for r in (a, b, c):
        sched.add_request(r)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["a"]  # b waits for a's blocks
    sched.update(out, runner.execute(out))
    out = sched.schedule()
    assert {s.request.request_id: s.num_new_tokens for s in out.scheduled} == {"a": 1, "b": 2, "c": 2}
    assert b.num_cached_tokens == c.num_cached_tokens == 16 and a.num_cached_tokens == 0
    assert a.block_ids[:4] == b.block_ids[:4] == c.block_ids[:4]
    assert [sched.block_manager.blocks[x].ref_count for x in a.block_ids[:4]] == [3] * 4
    check_invariants(sched, out)
    sched.update(out, runner.execute(out))
    done = drive(sched, runner)
    assert all(r.output_token_ids == reference_outputs(prompt, 4) for r in done.values())
    assert sched.block_manager.num_prefix_hits == 32


def test_later_request_hits_a_finished_requests_blocks_unless_salted():
    sched, runner = make_sched(), FakeRunner(4)
    prompt = list(range(1, 11))
    sched.add_request(make_req("a", prompt, max_tokens=3, salt="x"))
    drive(sched, runner)
    for rid, salt, hit in (("b", "x", 8), ("c", "y", 0), ("d", None, 0)):
        r = make_req(rid, prompt, max_tokens=3, salt=salt)
        sched.add_request(r)
        drive(sched, runner)
        assert r.num_cached_tokens == hit, rid
    # a follow-up turn (prompt + reply + more) hits the blocks that held the reply as well
    follow = make_req("e", prompt + reference_outputs(prompt, 3) + [5, 6, 7], max_tokens=2, salt="x")
    sched.add_request(follow)
    drive(sched, runner)
    assert follow.num_cached_tokens == 12


def test_chunked_prefill_of_shared_prompt_waits_for_each_chunk():
    sched, runner = make_sched(max_num_tokens=16), FakeRunner(4)
    prompt = list(range(1, 41))
    for rid in "ab":
        sched.add_request(make_req(rid, prompt, max_tokens=3))
    done = drive(sched, runner)
    assert done["b"].num_cached_tokens == 36
    assert done["a"].output_token_ids == done["b"].output_token_ids == reference_outputs(prompt, 3)


def _proposer(k: int, wrong_at):
    """Drafts k tokens: the model's own continuation, corrupted at index wrong_at(step) (or never)."""
    def propose(req, step):
        if req.num_computed_tokens < req.num_tokens - 1:
            return  # still prefilling
        ctx, drafts = list(req.all_token_ids), []
        for i in range(k):
            t = next_token(ctx + drafts)
            drafts.append(t + 1 if i == wrong_at(step) else t)
        req.spec_token_ids = drafts
    return propose


def test_spec_tokens_accepted_and_rolled_back():
    sched, runner = make_sched(block_size=4), FakeRunner(4)
    r = make_req("a", 6, max_tokens=30)
    sched.add_request(r)
    out = sched.schedule()
    sched.update(out, runner.execute(out))  # prompt; first token sampled
    assert r.num_computed_tokens == 6 and r.num_tokens == 7
    _proposer(5, lambda s: 2)(r, 0)  # two drafts right, the third wrong
    out = sched.schedule()
    item = out.scheduled[0]
    assert (item.num_new_tokens, item.num_draft_tokens, item.is_sampling) == (6, 5, True)
    assert item.token_ids()[1:] == r.spec_token_ids and len(r.block_ids) == 3  # 12 positions
    sampled = runner.execute(out)
    assert len(sampled["a"]) == 3  # 2 accepted + the correction
    sched.update(out, sampled)
    assert r.num_tokens == 10 and r.num_computed_tokens == 9 and r.spec_token_ids == []
    assert len(r.block_ids) == 3  # ceil(9 / 4): the draft-only tail block was released
    check_invariants(sched)
    _proposer(5, lambda s: 9)(r, 0)  # all right: 5 accepted + bonus
    out = sched.schedule()
    sched.update(out, runner.execute(out))
    assert r.num_tokens == 16 and r.num_computed_tokens == 15
    drive(sched, runner)
    assert r.output_token_ids == reference_outputs(r.prompt_token_ids, 30)


def test_drafts_are_trimmed_to_max_tokens_and_budget():
    sched, runner = make_sched(max_num_tokens=4), FakeRunner(4)
    r = make_req("a", 4, max_tokens=3)
    sched.add_request(r)
    out = sched.schedule()
    sched.update(out, runner.execute(out))
    r.spec_token_ids = [1, 2, 3, 4, 5]
    out = sched.schedule()
    assert out.scheduled[0].num_draft_tokens == 1 and r.spec_token_ids == [1]  # 1 output + 1 + bonus = 3
    sched.update(out, runner.execute(out))
    r2 = make_req("b", 4, max_tokens=20)
    sched.add_request(r2)

    def propose(q, step):  # 9 (mostly wrong) drafts; the 4-token budget takes 1 + 3 of them
        if q.num_computed_tokens == q.num_tokens - 1:
            q.spec_token_ids = [7] * 9

    seen_drafts = []

    def on_step(step, out):
        seen_drafts.extend(s.num_draft_tokens for s in out.scheduled)
        for s in out.scheduled:
            assert s.num_new_tokens <= 4 and s.num_draft_tokens <= 3

    drive(sched, runner, propose=propose, on_step=on_step)
    assert max(seen_drafts) == 3
    assert r2.num_output_tokens == 20 and r2.output_token_ids == reference_outputs(r2.prompt_token_ids, 20)


@pytest.mark.parametrize("policy", ["max_utilization", "guaranteed_no_evict"])
@pytest.mark.parametrize("chunked", [True, False])
def test_randomized_run_matches_reference(policy, chunked):
    """Random arrivals, shared prefixes, salts, drafts on odd requests, aborts: every step keeps the
    invariants, and every request that was not aborted ends with the reference greedy outputs."""
    rng = random.Random(f"{policy}{chunked}")
    sched = make_sched(num_blocks=32, block_size=4, max_num_tokens=32, max_batch_size=6, max_seq_len=96,
                       policy=policy, chunked=chunked)
    runner, propose = FakeRunner(4), _proposer(3, lambda s: s % 4)
    shared = [rng.randrange(1, 90) for _ in range(12)]
    arrivals, expected = [], {}
    for i in range(40):
        prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(1, 90) for _ in range(rng.randrange(1, 20))]
        r = make_req(f"r{i}", prompt, max_tokens=rng.randrange(1, 30), salt=rng.choice([None, "lora"]))
        arrivals.append((rng.randrange(0, 80), r))
        expected[r.request_id] = reference_outputs(prompt, r.max_tokens)
    arrivals.sort(key=lambda a: a[0])
    done, aborted, num_preempted, num_drafts = {}, set(), 0, 0
    for step in range(2000):
        while arrivals and arrivals[0][0] <= step:
            sched.add_request(arrivals.pop(0)[1])
        if step % 23 == 5 and sched.running:
            aborted.add(sched.running[-1].request_id)
            sched.abort_request(sched.running[-1].request_id)
        if not arrivals and not sched.has_unfinished_requests():
            break
        for r in sched.running:
            if int(r.request_id[1:]) % 2:
                propose(r, step)
        out = sched.schedule()
        check_invariants(sched, out)
        num_preempted += len(out.preempted_ids)
        num_drafts += sum(s.num_draft_tokens for s in out.scheduled)
        for r in sched.update(out, runner.execute(out)):
            done[r.request_id] = r
        check_invariants(sched)
    for rid, want in expected.items():
        if rid not in aborted:
            assert done[rid].output_token_ids == want, rid
    bm = sched.block_manager
    assert bm.num_free_blocks == 32 and num_drafts > 0 and bm.num_prefix_hits > 0
    assert (num_preempted > 0) == (policy == "max_utilization")
