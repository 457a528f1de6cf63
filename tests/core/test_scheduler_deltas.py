"""The scheduler's step output is a delta: each request's data goes to the runner once, then only what
changed (new tokens, new block ids). The fake runner rebuilds every row from the deltas alone and
checks it against the live request each step (core_fakes.FakeRunner)."""

import pickle

from core_fakes import FakeRunner, drive, make_req, make_sched

from ember.sampling_params import SamplingParams


def test_each_token_and_block_is_sent_once():
    sched, runner = make_sched(num_blocks=128, block_size=4, max_seq_len=512), FakeRunner(4)
    r = make_req("a", 10, max_tokens=300)
    sched.add_request(r)
    per_step = []
    drive(sched, runner, on_step=lambda step, out: per_step.append(out.scheduled))
    first, rest = per_step[0][0], [s[0] for s in per_step[1:] if s]
    assert first.new_request is not None and first.new_request.prompt_token_ids == r.prompt_token_ids
    assert all(s.new_request is None and len(s.new_token_ids) == 1 and len(s.new_block_ids) <= 1 for s in rest)
    # what crossed to the runner: the prompt once, then each output but the last once
    assert runner.num_delta_tokens == 10 + 300 - 1


def test_preempted_request_is_sent_again_whole():
    # 6 blocks of 4: two requests of 8 prompt tokens outgrow them, so the newer one is preempted
    sched, runner = make_sched(num_blocks=6, block_size=4, max_num_tokens=64), FakeRunner(4)
    a, b = make_req("a", 8, max_tokens=10), make_req("b", 8, max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    seen = []

    def on_step(step, out):
        seen.append((list(out.preempted_ids), {s.request_id: s.new_request for s in out.scheduled}))

    drive(sched, runner, on_step=on_step)
    preempted_at = next(i for i, (ids, _) in enumerate(seen) if ids)
    victim = seen[preempted_at][0][0]
    resumed = next(news[victim] for _, news in seen[preempted_at + 1:] if victim in news)
    assert resumed is not None and resumed.output_token_ids  # its outputs so far travel with it once


def test_pickled_step_carries_no_request_objects():
    sched, runner = make_sched(), FakeRunner(4)
    sched.add_request(make_req("a", 6, max_tokens=3, temperature=0.5, seed=7))
    out = sched.schedule()
    copy = pickle.loads(pickle.dumps(out))
    item = copy.scheduled[0]
    assert item.request is None and item.request_id == "a"
    assert item.new_request.sampling_params == SamplingParams(max_tokens=3, temperature=0.5, seed=7)
    assert item.new_block_ids == out.scheduled[0].request.block_ids
    sched.update(out, runner.execute(out))
