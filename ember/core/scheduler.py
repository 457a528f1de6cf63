"""The one scheduler: every step, each request's num_computed_tokens catches up with its known tokens
(prompt + outputs + drafts) under one token budget. Prefill, chunked prefill, decode, prefix hits,
recomputation after preemption and speculative verification are the same path; there are no phases.

Order and fairness. Running requests are served first, oldest first; then waiting requests, strictly
in queue order: when the head of the queue cannot be admitted (budget, batch size, blocks, reserve,
or a prefix being computed by another request this step) nothing behind it is admitted either, so a
request is never overtaken by a later one that happens to fit (no head-of-line skipping). Preempted
requests go back to the front of the queue.

Policies. `guaranteed_no_evict` admits a request only if the worst case of its KV (prompt + max_tokens)
fits beside the worst case of everything running, and never preempts. `max_utilization` admits whenever
this step's blocks are there; when a running request cannot get a block, the newest running request
is preempted by recomputation (blocks freed, num_computed_tokens reset, outputs kept).

Prefix sharing between requests added together (n > 1): the first request's full prompt blocks are
registered when scheduled; a second request whose lookup meets such a block waits one step (and the
queue behind it too) and then hits all of them, instead of reading K/V not written yet.

What the runner is told. The scheduler remembers, per running request, how many of its tokens and
block ids the runner has (`_RunnerView`); each ScheduledRequest carries only what was appended since
(ember.core.outputs), and a request the runner does not hold (new, or resumed after preemption) is sent
whole once. A preemption or a finish forgets the view (the runner drops the row on the same ids).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from ember.core.block_manager import BlockManager
from ember.core.window_blocks import HybridBlockManager
from ember.core.outputs import NewRequestData, ScheduledRequest, SchedulerOutput
from ember.core.request import Request, RequestStatus
from ember.errors import ContextLengthExceededError, InvalidRequestError, QueueFullError


class SchedulerPolicy(str, enum.Enum):
    GUARANTEED_NO_EVICT = "guaranteed_no_evict"
    MAX_UTILIZATION = "max_utilization"


@dataclass
class _RunnerView:
    """How much of one running request the runner holds (its row's tokens and block table)."""

    num_tokens: int  # prompt + outputs sent
    num_block_ids: int  # leading block ids sent (and still the request's)
    num_window_block_ids: int = 0  # the same for the sliding layers' table (ember.core.window_blocks)


class Scheduler:
    """Decides which requests run each step and how many tokens each, and applies sampled tokens."""

    def __init__(self, block_manager: BlockManager | HybridBlockManager, max_num_tokens: int, max_batch_size: int, max_seq_len: int,
                 policy: SchedulerPolicy | str = SchedulerPolicy.GUARANTEED_NO_EVICT,
                 enable_chunked_prefill: bool = True, max_queue_size: int | None = None,
                 max_loras: int | None = None):
        self.block_manager = block_manager
        self.max_num_tokens = max_num_tokens  # token budget per step
        self.max_batch_size = max_batch_size  # running requests at most
        self.max_seq_len = max_seq_len  # prompt + outputs at most
        self.policy = SchedulerPolicy(policy.lower() if isinstance(policy, str) else policy)
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_queue_size = max_queue_size  # waiting requests at most; None or 0: unbounded
        self.max_loras = max_loras  # distinct LoRA adapters among running requests at most; None: no limit
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order (oldest first)
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self._finished_ids: list[str] = []  # since the last schedule()
        self._runner_views: dict[str, _RunnerView] = {}  # running requests the runner holds a row for

    # ---- requests -----------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_request(self, req: Request) -> None:
        """Queue a request, or refuse at once one that can never run (InvalidRequestError and its
        ContextLengthExceededError) or that finds the queue full (QueueFullError)."""
        n = req.num_prompt_tokens
        if n == 0:
            raise InvalidRequestError("the prompt is empty; give at least one token", param="prompt")
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use", param="request_id")
        if n >= self.max_seq_len:
            raise ContextLengthExceededError(
                f"the prompt has {n} tokens, which leaves no room to generate within the maximum context "
                f"length of {self.max_seq_len} tokens", param="prompt")
        if req.max_tokens is None:
            req.max_tokens = self.max_seq_len - n
        if req.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens={req.max_tokens} must be at least 1", param="max_tokens")
        if n + req.max_tokens > self.max_seq_len:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.max_seq_len} tokens, but the request asks for "
                f"{n + req.max_tokens} ({n} in the prompt, {req.max_tokens} to generate)", param="max_tokens")
        if not self.enable_chunked_prefill and n > self.max_num_tokens:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but max_num_tokens is {self.max_num_tokens} and chunked prefill "
                f"is off", param="prompt")
        need, total = self._worst_case_blocks(req), self.block_manager.num_blocks
        if need > total:
            raise InvalidRequestError(
                f"the request needs up to {need} KV cache blocks ({n} prompt tokens + max_tokens="
                f"{req.max_tokens}) but the cache has {total}; lower max_tokens or the prompt length",
                param="max_tokens")
        if self.max_queue_size and len(self.waiting) >= self.max_queue_size:
            raise QueueFullError(f"the waiting queue is full ({self.max_queue_size} requests); retry later")
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort_request(self, request_id: str) -> Request | None:
        """Finish a request as aborted and free its blocks now; None if it is unknown or finished."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
                       ) -> Request | None:
        """End a request from outside update() (a stop string matched, or an abort)."""
        assert status.is_finished, status
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, status, stop_reason)
        return req

    def _finish(self, req: Request, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        req.status, req.stop_reason = status, stop_reason
        req.spec_token_ids = []
        self.block_manager.free(req)
        self._runner_views.pop(req.request_id, None)
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch: running requests first (oldest first), then waiting ones in order."""
        bm = self.block_manager
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.max_num_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            self._trim_drafts(req)
            num_new = min(req.num_known_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:  # nothing to compute (only if a sampling step returned no token)
                i += 1
                continue
            while not bm.allocate_slots(req, num_new):
                if self.policy == SchedulerPolicy.GUARANTEED_NO_EVICT:
                    break  # cannot happen while the reserve is honoured; skip rather than evict
                victim = self.running.pop()  # the newest; never one already scheduled this step
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is req:
                    break
            else:
                out.scheduled.append(self._scheduled(req, num_new))
                budget -= num_new
            i += 1

        loras = {r.lora_name for r in self.running if r.lora_name is not None} if self.max_loras else set()
        while self.waiting and budget > 0 and not out.preempted_ids and len(self.running) < self.max_batch_size:
            req = self.waiting[0]
            if req.lora_name is not None and self.max_loras and req.lora_name not in loras \
                    and len(loras) >= self.max_loras:
                break  # every adapter slot is taken by running requests: wait for one to free up
            prefix = bm.get_computed_blocks(req)
            if prefix.is_pending:
                break  # its prefix is being computed this step by another request: hit it next step
            num_new = req.num_tokens - prefix.num_tokens
            if num_new > budget:
                # Chunking off: whole or not at all, except a resumed request longer than any budget.
                if not self.enable_chunked_prefill and num_new <= self.max_num_tokens:
                    break
                num_new = budget
            if self.policy == SchedulerPolicy.GUARANTEED_NO_EVICT and not self._can_reserve(req, prefix):
                break
            if not bm.allocate_slots(req, num_new, prefix):
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:  # first admission, not a resumption
                req.num_cached_tokens = prefix.num_tokens
            req.num_computed_tokens = prefix.num_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if req.lora_name is not None and self.max_loras:
                loras.add(req.lora_name)
            out.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
        out.num_batched_tokens = self.max_num_tokens - budget
        return out

    def update(self, sched_out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Apply a step's results: advance num_computed_tokens to the valid KV (non-draft tokens plus
        accepted drafts, the rest of the blocks rolled back), append sampled tokens, finish requests
        on eos / stop_token_ids / max_tokens, free their blocks. Returns the requests finished here."""
        bm = self.block_manager
        bm.mark_computed()
        finished = []
        for item in sched_out.scheduled:
            req = item.request
            if req.status != RequestStatus.RUNNING:
                continue  # aborted or finished between schedule() and update()
            tokens = sampled.get(req.request_id, []) if item.is_sampling else []
            num_accepted = max(0, min(len(tokens) - 1, item.num_draft_tokens))
            req.num_computed_tokens = item.seq_len - item.num_draft_tokens + num_accepted
            req.spec_token_ids = []  # consumed; the proposer sets fresh ones
            if item.num_draft_tokens:
                bm.truncate(req, req.num_computed_tokens)
                view = self._runner_views.get(req.request_id)
                if view is not None:  # released tail blocks: the next step rewrites the row from here
                    view.num_block_ids = min(view.num_block_ids, len(req.block_ids))
                    view.num_window_block_ids = min(view.num_window_block_ids, len(req.window_block_ids))
            for token_id in tokens[:num_accepted + 1]:
                req.append_output_token_ids(token_id)
                status, reason = self._check_stop(req, token_id)
                if status is not None:
                    self.running.remove(req)
                    self._finish(req, status, reason)
                    finished.append(req)
                    break
        return finished

    # ---- helpers ------------------------------------------------------------------------------
    def _scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        """This step's entry for `req`: only what the runner does not hold yet (O(new tokens + new blocks))."""
        num_draft = max(0, req.num_computed_tokens + num_new - req.num_tokens)
        del req.spec_token_ids[num_draft:]  # drafts the budget left out are dropped, not deferred
        item = ScheduledRequest(request=req, request_id=req.request_id, num_computed_tokens=req.num_computed_tokens,
                                num_new_tokens=num_new, num_draft_tokens=num_draft,
                                is_sampling=req.num_computed_tokens + num_new >= req.num_tokens,
                                draft_token_ids=list(req.spec_token_ids))
        view = self._runner_views.get(req.request_id)
        if view is None:
            params = req.sampling_params
            item.new_request = NewRequestData(
                request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                output_token_ids=list(req.output_token_ids), sampling_params=params,
                eos_token_ids=sorted(req.eos_token_ids), lora_name=req.lora_name)
            item.new_block_ids = list(req.block_ids)
            item.new_window_block_ids = list(req.window_block_ids)
            self._runner_views[req.request_id] = _RunnerView(req.num_tokens, len(req.block_ids),
                                                             len(req.window_block_ids))
            return item
        if view.num_tokens < req.num_tokens:
            item.new_token_ids = req.all_token_ids[view.num_tokens:]
            view.num_tokens = req.num_tokens
        item.block_ids_start = view.num_block_ids
        if view.num_block_ids < len(req.block_ids):
            item.new_block_ids = req.block_ids[view.num_block_ids:]
            view.num_block_ids = len(req.block_ids)
        item.window_block_ids_start = view.num_window_block_ids
        if view.num_window_block_ids < len(req.window_block_ids):
            item.new_window_block_ids = req.window_block_ids[view.num_window_block_ids:]
            view.num_window_block_ids = len(req.window_block_ids)
        return item

    def _trim_drafts(self, req: Request) -> None:
        """Drafts only for outputs that can still be emitted: accepted drafts + 1 <= remaining tokens.
        This also bounds the KV a request ever needs by prompt + max_tokens - 1 positions."""
        room = req.max_tokens - req.num_output_tokens - 1
        if len(req.spec_token_ids) > room:
            del req.spec_token_ids[max(0, room):]

    def _check_stop(self, req: Request, token_id: int) -> tuple[RequestStatus | None, int | None]:
        if req.num_output_tokens > req.sampling_params.min_tokens:
            if token_id in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if token_id in req.sampling_params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token_id
        if req.num_output_tokens >= req.max_tokens:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        self._runner_views.pop(req.request_id, None)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def _worst_case_blocks(self, req: Request) -> int:
        # the last output token is never fed back, so at most prompt + max_tokens - 1 positions get KV
        return self.block_manager.num_blocks_for(req.num_prompt_tokens + req.max_tokens - 1)

    def _can_reserve(self, req: Request, prefix) -> bool:
        """guaranteed_no_evict: the free blocks cover what every running request may still allocate
        plus all of this one's worst case, less the hit blocks other requests hold already."""
        bm = self.block_manager
        reserved = sum(self._worst_case_blocks(r) - len(r.block_ids) for r in self.running)
        shared = sum(1 for b in prefix.block_ids if bm.blocks[b].ref_count > 0)
        return reserved + self._worst_case_blocks(req) - shared <= bm.num_free_blocks
