"""LLMEngine: the synchronous engine. `step()` is the whole main loop: schedule, run, update.

It owns the checkpoint, tokenizer, ModelRunner, Scheduler and the per-sequence detokenizer states. A
user request with `n` > 1 becomes n core Requests (a `RequestGroup`); their prompts share KV blocks
through the prefix cache.
"""

from __future__ import annotations

import logging
import time

from ember.core.request import Request, RequestStatus
from ember.engine.detokenizer import Detokenizer
from ember.structured.backend import GrammarBackend
from ember.structured.bitmask import advance
from ember.engine.request_group import RequestGroup
from ember.engine.setup import EngineSetup, build_engine_setup
from ember.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.spec import NoSpeculator
from ember.worker.model_runner import ModelRunnerOutput

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, cfg, setup: EngineSetup | None = None):
        self.cfg = cfg
        s = setup or build_engine_setup(cfg)
        self.setup = s
        self.tokenizer = s.tokenizer
        self.runner = s.runner
        self.scheduler = s.scheduler
        self.speculator = s.speculator or NoSpeculator()  # proposes drafts before schedule(), hears results after
        self.max_model_len = s.max_model_len
        self.eos_token_ids = set(s.eos_token_ids)
        self.detokenizer = Detokenizer(self.tokenizer)
        # built eagerly: requests are validated on the server's thread, steps run on the engine's
        self.grammar = GrammarBackend(self.tokenizer, self.runner.vocab_size, sorted(self.eos_token_ids))
        self.groups: dict[str, RequestGroup] = {}  # user request id -> its sequences
        self.seq_to_group: dict[str, RequestGroup] = {}  # core request id -> group
        self.stats_prompt_tokens = 0
        self.stats_generation_tokens = 0
        self.stats_draft_tokens = 0  # speculative tokens verified
        self.stats_accepted_tokens = 0  # of those, accepted

    @property
    def lora_names(self) -> list[str]:
        """LoRA adapters requests may name (configured ones, plus any loaded at run time)."""
        manager = getattr(self.runner, "lora_manager", None)
        return manager.names if manager is not None else []

    # ---- requests -------------------------------------------------------------------------------
    def make_group(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                   arrival_time: float | None = None, cache_salt: str | None = None,
                   lora_name: str | None = None) -> RequestGroup:
        """Tokenize and validate a request without touching the scheduler (safe from any thread)."""
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        if lora_name is not None:
            if lora_name not in self.lora_names:
                raise ModelNotFoundError(f"LoRA adapter {lora_name!r} is not served here; served adapters: "
                                         f"{', '.join(self.lora_names) or 'none'}", param="model")
            # the adapter changes every layer's K/V: prefix blocks are never shared across adapters
            cache_salt = f"lora:{lora_name}" if cache_salt is None else f"lora:{lora_name}:{cache_salt}"
        if isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, prompt_ids = None, [int(t) for t in prompt]
        self.speculator.check(params)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty; give at least one token", param="prompt")
        vocab = self.runner.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        num_prompt = len(prompt_ids)
        room = self.max_model_len - num_prompt
        if params.max_tokens is None:
            if room < 1:
                raise ContextLengthExceededError(
                    f"the prompt has {num_prompt} tokens, which leaves no room in the model's context of "
                    f"{self.max_model_len} tokens", param="messages")
            max_tokens = room
        else:
            max_tokens = params.max_tokens
            if num_prompt + max_tokens > self.max_model_len:
                raise ContextLengthExceededError(
                    f"this model's maximum context length is {self.max_model_len} tokens, but the request asks "
                    f"for {num_prompt + max_tokens} ({num_prompt} in the prompt, {max_tokens} to generate); reduce "
                    f"the prompt or max_tokens", param="max_tokens")
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        eos = set() if params.ignore_eos else set(self.eos_token_ids)
        seqs = []
        for i in range(params.n):
            seq_params = params if params.seed is None or i == 0 else params.clone(seed=params.seed + i)
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seqs.append(Request(request_id=seq_id, prompt_token_ids=list(prompt_ids), sampling_params=seq_params,
                                eos_token_ids=eos, max_tokens=max_tokens, arrival_time=arrival,
                                cache_salt=cache_salt, lora_name=lora_name))
        if params.structured is not None:  # compiled once (cached by spec); a bad grammar is a 400 here
            for seq in seqs:
                seq.matcher = self.grammar.new_matcher(params.structured)
        return RequestGroup.create(request_id, prompt_text, prompt_ids, params, seqs, self.detokenizer, arrival)

    def add_group(self, group: RequestGroup) -> None:
        """Hand a validated group to the scheduler; on refusal nothing of it stays queued."""
        added = []
        try:
            for seq in group.seqs:
                self.scheduler.add_request(seq)
                added.append(seq)
        except Exception:
            for seq in added:
                self.scheduler.abort_request(seq.request_id)
            raise
        self.groups[group.request_id] = group
        self.stats_prompt_tokens += len(group.prompt_token_ids)
        for seq in group.seqs:
            self.seq_to_group[seq.request_id] = group

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, **kw) -> None:
        self.add_group(self.make_group(request_id, prompt, params, **kw))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for seq in group.seqs:
            if not seq.status.is_finished:
                self.scheduler.abort_request(seq.request_id)
            self._forget_seq(seq.request_id)
        group.mark_aborted()
        return group.to_output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups) or self.scheduler.has_unfinished_requests()

    # ---- the ranks running the model (ember.worker.executor) ----------------------------------
    def check_health(self) -> None:
        """Raise EngineDeadError when a tensor-parallel worker rank is gone (engine thread only)."""
        if getattr(self.setup, "executor", None) is not None:
            self.setup.executor.check_health()

    def dead_reason(self) -> str | None:
        """Why the model can no longer run (a worker rank died), or None. Safe from any thread."""
        executor = getattr(self.setup, "executor", None)
        return executor.dead_reason() if executor is not None else None

    def shutdown(self) -> None:
        """Stop the worker ranks, if any (a no-op with tensor_parallel_count 1)."""
        if getattr(self.setup, "executor", None) is not None:
            self.setup.executor.shutdown()

    # ---- the main loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        spec = self.speculator.propose(self.scheduler.running)  # sets request.spec_token_ids
        sched_out = self.scheduler.schedule()
        runner_out = self.runner.execute(sched_out, spec) if sched_out.scheduled else ModelRunnerOutput()
        finished = self.scheduler.update(sched_out, runner_out.sampled_token_ids)
        self.speculator.observe(sched_out, runner_out.spec)
        return self._process(sched_out, runner_out, finished)

    def _process(self, sched_out, runner_out: ModelRunnerOutput, finished: list[Request]) -> list[RequestOutput]:
        now = time.monotonic()
        touched: dict[str, RequestGroup] = {}
        for item in sched_out.scheduled:
            seq = item.request
            group = self.seq_to_group.get(seq.request_id)
            if group is None:
                continue
            new_ids = runner_out.sampled_token_ids.get(seq.request_id, [])
            if len(new_ids) > 1:  # verified drafts may run past eos / a stop id / max_tokens: keep what
                new_ids = new_ids[:max(0, seq.num_output_tokens - group.num_output_tokens(seq))]  # update kept
            self.stats_generation_tokens += len(new_ids)
            stop_hit = group.on_step(seq, new_ids, runner_out.logprobs.get(seq.request_id), now)
            spec = runner_out.spec.get(seq.request_id)
            if spec is not None:
                group.on_spec(seq, spec.num_draft_tokens, len(spec.accepted_nodes))
                self.stats_draft_tokens += spec.num_draft_tokens
                self.stats_accepted_tokens += len(spec.accepted_nodes)
            if new_ids and seq.matcher is not None and advance(seq.matcher, new_ids):
                stop_hit = True  # the grammar is complete (or refused a token): the output is done
            if stop_hit and not seq.status.is_finished:
                self.scheduler.finish_request(seq.request_id, RequestStatus.FINISHED_STOPPED)
            touched[group.request_id] = group
        for seq in finished:
            group = self.seq_to_group.get(seq.request_id)
            if group is not None:
                group.on_finished(seq, now)
                touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            for seq in group.seqs:
                if seq.status.is_finished:
                    group.on_finished(seq, now)
            outputs.append(group.to_output())
            if group.is_finished:
                self.groups.pop(group.request_id, None)
                for seq in group.seqs:
                    self._forget_seq(seq.request_id)
        return outputs

    def _forget_seq(self, seq_id: str) -> None:
        self.seq_to_group.pop(seq_id, None)
        self.runner.free_request(seq_id)
        self.speculator.free(seq_id)
