"""Scheduler: admission, chunking, policies, preemption, FCFS, refusals, aborts and stop conditions,
driven by a fake runner that checks the KV each step reads."""

import pytest
from core_fakes import FakeRunner, check_invariants, drive, make_req, make_sched, reference_outputs

from ember.core import RequestStatus
from ember.errors import ContextLengthExceededError, InvalidRequestError, QueueFullError


def step(sched, runner):
    out = sched.schedule()
    check_invariants(sched, out)
    finished = sched.update(out, runner.execute(out))
    check_invariants(sched)
    return out, finished


def test_single_request_runs_to_max_tokens():
    sched = make_sched()
    r = make_req("a", 10, max_tokens=5)
    sched.add_request(r)
    done = drive(sched, FakeRunner(4))
    assert done["a"].status == RequestStatus.FINISHED_LENGTH and r.finish_reason == "length"
    assert r.output_token_ids == reference_outputs(r.prompt_token_ids, 5)
    assert sched.block_manager.num_free_blocks == 64 and not sched.has_unfinished_requests()


def test_chunked_prefill_splits_budget_and_decodes_keep_flowing():
    sched, runner = make_sched(max_num_tokens=32), FakeRunner(4)
    sched.add_request(make_req("d", 4, max_tokens=20))
    step(sched, runner)  # d's prompt; d decodes from now on
    sched.add_request(make_req("p", 100, max_tokens=2))
    chunks = []
    for _ in range(4):
        out, _ = step(sched, runner)
        by_id = {s.request.request_id: s for s in out.scheduled}
        assert by_id["d"].num_new_tokens == 1 and by_id["d"].is_sampling  # first in the batch
        assert out.scheduled[0].request.request_id == "d"
        chunks.append((by_id["p"].num_new_tokens, by_id["p"].is_sampling))
    assert chunks == [(31, False), (31, False), (31, False), (7, True)]
    drive(sched, runner)


def test_chunking_off_schedules_prompts_whole_or_not_at_all():
    sched, runner = make_sched(max_num_tokens=32, chunked=False), FakeRunner(4)
    with pytest.raises(InvalidRequestError, match="max_num_tokens"):
        sched.add_request(make_req("big", 33))
    sched.add_request(make_req("d", 4, max_tokens=20))
    step(sched, runner)
    sched.add_request(make_req("p", 32, max_tokens=2))
    out, _ = step(sched, runner)  # 1 decode token leaves 31: p waits
    assert [s.request.request_id for s in out.scheduled] == ["d"] and sched.num_waiting == 1
    drive(sched, runner)


def test_guaranteed_no_evict_reserves_worst_case():
    # worst case of each: ceil((8 + 12 - 1) / 4) = 5 blocks; 12 blocks hold two of them
    sched, runner = make_sched(num_blocks=12, policy="guaranteed_no_evict"), FakeRunner(4)
    for rid in "abc":
        sched.add_request(make_req(rid, 8, max_tokens=12))
    out, _ = step(sched, runner)
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"] and sched.num_waiting == 1
    seen_c = []
    done = drive(sched, runner, on_step=lambda i, o: seen_c.append(any(s.request.request_id == "c"
                                                                         for s in o.scheduled)))
    assert all(r.num_preemptions == 0 for r in done.values()) and any(seen_c)
    for r in done.values():
        assert r.output_token_ids == reference_outputs(r.prompt_token_ids, 12)


def test_max_utilization_preempts_newest_and_resumes_by_recomputation():
    sched, runner = make_sched(num_blocks=12, policy="max_utilization"), FakeRunner(4)
    reqs = [make_req(rid, 8, max_tokens=12) for rid in "abc"]
    for r in reqs:
        sched.add_request(r)
    preempted = []
    done = drive(sched, runner, on_step=lambda i, o: preempted.extend(o.preempted_ids))
    assert preempted and preempted[0] == "c"  # the newest goes first
    assert reqs[2].num_preemptions >= 1
    for r in done.values():  # resumed requests continue exactly where they left off
        assert r.output_token_ids == reference_outputs(r.prompt_token_ids, 12)


def test_preempted_request_goes_to_the_front_and_recomputes_outputs():
    sched, runner = make_sched(num_blocks=6, policy="max_utilization", prefix=False), FakeRunner(4)
    a, b = make_req("a", 8, max_tokens=12), make_req("b", 7, max_tokens=12)
    sched.add_request(a)
    sched.add_request(b)
    while not b.num_preemptions:
        step(sched, runner)
    assert sched.waiting[0] is b and b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    kept = list(b.output_token_ids)
    assert kept  # outputs survive preemption
    while b.status != RequestStatus.RUNNING:
        out, _ = step(sched, runner)
    item = next(s for s in out.scheduled if s.request is b)
    assert item.num_computed_tokens == 0 and item.num_new_tokens == 7 + len(kept) and item.is_sampling
    assert b.output_token_ids[:len(kept)] == kept
    drive(sched, runner)
    assert b.output_token_ids == reference_outputs(b.prompt_token_ids, 12)


def test_fcfs_head_is_not_overtaken():
    sched, runner = make_sched(num_blocks=12, policy="guaranteed_no_evict"), FakeRunner(4)
    sched.add_request(make_req("a", 8, max_tokens=20))  # 7 blocks worst case
    sched.add_request(make_req("big", 8, max_tokens=20))  # does not fit beside a
    sched.add_request(make_req("small", 4, max_tokens=2))  # would fit, but must wait for big
    order = []
    drive(sched, runner, on_step=lambda i, o: order.extend(s.request.request_id for s in o.scheduled
                                                           if s.num_computed_tokens == 0))
    assert order == ["a", "big", "small"]


def test_max_batch_size_is_respected():
    sched = make_sched(max_batch_size=2)
    for i in range(5):
        sched.add_request(make_req(f"r{i}", 5, max_tokens=3))
    drive(sched, FakeRunner(4))  # check_invariants asserts len(running) <= 2


def test_refusals():
    sched = make_sched(num_blocks=16, max_seq_len=64, max_queue_size=2)
    with pytest.raises(ContextLengthExceededError, match="maximum context length is 64"):
        sched.add_request(make_req("a", 40, max_tokens=30))
    with pytest.raises(ContextLengthExceededError):
        sched.add_request(make_req("a", 64, max_tokens=1))
    r = make_req("n", 10, max_tokens=None)
    sched.add_request(r)
    assert r.max_tokens == 54
    sched.abort_request("n")
    sched.add_request(make_req("a", 4))
    with pytest.raises(InvalidRequestError, match="already in use"):
        sched.add_request(make_req("a", 4))
    sched.add_request(make_req("b", 4))
    with pytest.raises(QueueFullError):
        sched.add_request(make_req("c", 4))
    assert sched.num_waiting == 2
    small = make_sched(num_blocks=8, max_seq_len=64)  # 32 token positions of KV in all
    with pytest.raises(InvalidRequestError, match="KV cache blocks") as e:
        small.add_request(make_req("a", 20, max_tokens=20))  # 39 positions: 10 blocks
    assert e.value.param == "max_tokens"


def test_abort_frees_blocks_at_once():
    sched, runner = make_sched(), FakeRunner(4)
    a, b = make_req("a", 10, max_tokens=50), make_req("b", 10, max_tokens=50)
    sched.add_request(a)
    step(sched, runner)
    sched.add_request(b)
    assert a.block_ids
    assert sched.abort_request("a") is a and a.block_ids == [] and a.status == RequestStatus.FINISHED_ABORTED
    assert sched.abort_request("b") is b and sched.num_waiting == 0
    assert sched.abort_request("a") is None
    check_invariants(sched)
    assert sched.block_manager.num_free_blocks == 64
    assert set(sched.schedule().finished_ids) == {"a", "b"}


def test_abort_between_schedule_and_update():
    sched, runner = make_sched(), FakeRunner(4)
    sched.add_request(make_req("a", 10))
    out = sched.schedule()
    sampled = runner.execute(out)
    sched.abort_request("a")
    assert sched.update(out, sampled) == []
    check_invariants(sched)


def test_eos_stop_ids_min_tokens_and_ignore_eos():
    script = {k: [5, 0, 6, 7, 0, 8] for k in ("eos", "min", "ign", "stop")}
    sched, runner = make_sched(), FakeRunner(4, script=script)
    sched.add_request(make_req("eos", 4, eos={0}))
    sched.add_request(make_req("min", 4, eos={0}, min_tokens=2))
    sched.add_request(make_req("ign", 4, max_tokens=6, eos={0}, ignore_eos=True))
    sched.add_request(make_req("stop", 4, stop_token_ids=[7]))
    done = drive(sched, runner)
    assert done["eos"].output_token_ids == [5, 0] and done["eos"].stop_reason is None
    assert done["min"].output_token_ids == [5, 0, 6, 7, 0]
    assert done["ign"].output_token_ids == [5, 0, 6, 7, 0, 8] and done["ign"].finish_reason == "length"
    assert done["stop"].output_token_ids == [5, 0, 6, 7] and done["stop"].stop_reason == 7
    assert all(done[k].finish_reason == "stop" for k in ("eos", "min", "stop"))


def test_finish_request_from_engine():
    sched, runner = make_sched(), FakeRunner(4)
    sched.add_request(make_req("a", 10, max_tokens=50))
    step(sched, runner)
    r = sched.finish_request("a", RequestStatus.FINISHED_STOPPED, "END")
    assert r.finish_reason == "stop" and r.stop_reason == "END" and not r.block_ids
    assert not sched.has_unfinished_requests()
