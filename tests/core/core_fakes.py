"""Test doubles for driving the core without torch: a deterministic fake model, a fake runner that
keeps a fake paged KV cache and checks every read against it, and an invariant checker."""

from __future__ import annotations

from ember.core import BlockManager, Request, RequestStatus, Scheduler, SchedulerOutput
from ember.sampling_params import SamplingParams


def next_token(ctx: list[int]) -> int:
    """The fake model's greedy choice: a function of the whole context (ids 100..149)."""
    return 100 + (ctx[-1] * 7 + len(ctx) * 3) % 50


def make_req(rid: str, prompt: list[int] | int, max_tokens: int = 8, salt: str | None = None,
             eos: set[int] | None = None, **params) -> Request:
    if isinstance(prompt, int):
        seed = sum(map(ord, rid)) * 13  # deterministic (str hashes are salted per process)
        prompt = [(seed + 7 * i) % 90 + 1 for i in range(prompt)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), eos_token_ids=eos or set(),
                   cache_salt=salt)


def make_sched(num_blocks=64, block_size=4, max_num_tokens=64, max_batch_size=8, max_seq_len=256,
               policy="max_utilization", chunked=True, prefix=True, max_queue_size=None) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(bm, max_num_tokens, max_batch_size, max_seq_len, policy, chunked, max_queue_size)


class FakeRunner:
    """Writes a digest of (salt, tokens[0..p]) into slot(p) for each new token, and before writing
    asserts that every position below num_computed_tokens already holds the right digest: a wrong
    prefix hit, a stale draft or a missed recomputation shows up as a mismatch.

    Like the real runner it keeps a row per running request built only from the step deltas (new
    requests once, then new tokens and new block ids), and checks each row against the live request:
    a delta the scheduler forgot to send shows up as a mismatch too."""

    def __init__(self, block_size: int, model=next_token, script: dict[str, list[int]] | None = None):
        self.block_size = block_size
        self.model = model
        self.script = script or {}  # request id -> the tokens it samples, in order (else the model)
        self.kv: dict[int, int] = {}  # slot -> prefix digest
        self.rows: dict[str, tuple[list[int], list[int]]] = {}  # request id -> (tokens, block table) from deltas
        self.num_steps = 0
        self.num_delta_tokens = 0  # token ids received, new requests included (what the deltas cost)

    def _slot(self, block_ids: list[int], p: int) -> int:
        return block_ids[p // self.block_size] * self.block_size + p % self.block_size

    @staticmethod
    def _digests(salt, tokens: list[int]) -> list[int]:
        h, out = hash(("salt", salt)), []
        for t in tokens:
            h = hash((h, t))
            out.append(h)
        return out

    def _apply_deltas(self, out: SchedulerOutput) -> None:
        for rid in out.finished_ids + out.preempted_ids:
            self.rows.pop(rid, None)
        for item in out.scheduled:
            new = item.new_request
            if new is not None:
                assert item.request_id not in self.rows, "a held request sent again as new"
                self.rows[item.request_id] = (list(new.prompt_token_ids) + list(new.output_token_ids), [])
                self.num_delta_tokens += len(new.prompt_token_ids) + len(new.output_token_ids)
            tokens, blocks = self.rows[item.request_id]
            tokens.extend(item.new_token_ids)
            self.num_delta_tokens += len(item.new_token_ids)
            del blocks[item.block_ids_start:]
            blocks.extend(item.new_block_ids)
            req = item.request
            assert tokens == req.all_token_ids, item.request_id
            assert blocks == req.block_ids, item.request_id
            assert item.draft_token_ids == req.spec_token_ids[:item.num_draft_tokens]

    def execute(self, out: SchedulerOutput) -> dict[str, list[int]]:
        self.num_steps += 1
        self._apply_deltas(out)
        for item in out.scheduled:  # reads: all before any write of this step
            req = item.request
            tokens, blocks = self.rows[item.request_id]
            assert item.num_computed_tokens == req.num_computed_tokens
            assert len(blocks) * self.block_size >= item.seq_len
            want = self._digests(req.cache_salt, tokens[:item.num_computed_tokens])
            for p, d in enumerate(want):
                assert self.kv.get(self._slot(blocks, p)) == d, (req.request_id, p)
        sampled = {}
        for item in out.scheduled:
            req = item.request
            tokens, blocks = self.rows[item.request_id]
            start, end = item.num_computed_tokens, item.seq_len - item.num_draft_tokens
            new = tokens[start:end] + item.draft_token_ids
            assert new == item.token_ids() and len(new) == item.num_new_tokens
            full = tokens[:start] + new
            for p, d in zip(item.positions(), self._digests(req.cache_salt, full)[start:]):
                self.kv[self._slot(blocks, p)] = d
            if item.is_sampling:
                sampled[req.request_id] = self._sample(req, full, item.num_draft_tokens)
        return sampled

    def _sample(self, req: Request, full: list[int], num_draft: int) -> list[int]:
        script = self.script.get(req.request_id)
        if script is not None:
            n = req.num_output_tokens
            return script[n:n + num_draft + 1]
        ctx, drafts = full[:len(full) - num_draft], full[len(full) - num_draft:]
        result = []
        for d in drafts:
            t = self.model(ctx)
            result.append(t)
            if t != d:
                return result
            ctx = ctx + [t]
        return result + [self.model(ctx)]


def check_invariants(sched: Scheduler, out: SchedulerOutput | None = None) -> None:
    bm = sched.block_manager
    held = [b for r in sched.running for b in r.block_ids]
    assert sum(b.ref_count for b in bm.blocks) == len(held)
    assert sum(1 for b in bm.blocks if b.ref_count > 0) + bm.num_free_blocks == bm.num_blocks
    assert all(bm.blocks[b].ref_count == 0 for b in bm._free)
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
        assert len(set(r.block_ids)) == len(r.block_ids)
        assert len(r.block_ids) >= bm.num_blocks_for(r.num_computed_tokens)
        assert r.num_tokens <= sched.max_seq_len
    for r in sched.waiting:
        assert not r.block_ids and r.num_computed_tokens == 0 and r.status != RequestStatus.RUNNING
    assert len(sched.running) <= sched.max_batch_size
    assert len(sched.requests) == len(sched.running) + len(sched.waiting)
    if out is not None:
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled) <= sched.max_num_tokens
        assert len({s.request.request_id for s in out.scheduled}) == len(out.scheduled)
        assert all(s.num_new_tokens > 0 for s in out.scheduled)
        if sched.policy.value == "guaranteed_no_evict":
            assert not out.preempted_ids


def drive(sched: Scheduler, runner: FakeRunner, propose=None, max_steps: int = 2000, on_step=None
          ) -> dict[str, Request]:
    """Step until nothing is unfinished, checking invariants each step; returns finished requests."""
    finished: dict[str, Request] = {}
    for step in range(max_steps):
        if not sched.has_unfinished_requests():
            return finished
        if propose is not None:
            for r in sched.running:
                propose(r, step)
        out = sched.schedule()
        check_invariants(sched, out)
        sampled = runner.execute(out)
        for r in sched.update(out, sampled):
            assert r.status.is_finished and not r.block_ids
            finished[r.request_id] = r
        check_invariants(sched)
        if on_step is not None:
            on_step(step, out)
    raise AssertionError("requests did not finish")


def reference_outputs(prompt: list[int], max_tokens: int) -> list[int]:
    ctx = list(prompt)
    for _ in range(max_tokens):
        ctx.append(next_token(ctx))
    return ctx[len(prompt):]
