"""EngineCore: the scheduler, the runner (through the executor), the speculator and the grammar matchers;
`step()` runs one forward and returns only what changed, per sequence (ember.engine.messages).

It knows nothing of text, stop strings or n > 1: the front end (LLMEngine in-process, AsyncLLM across a
socket) tokenizes, groups and detokenizes. The same class runs in-process for `LLM` and as its own program
for the server (ember.engine.core_proc).
"""

from __future__ import annotations

import logging
import time

from ember.checkpoint.sampling_defaults import merge as merge_sampling_defaults
from ember.core.request import Request, RequestStatus
from ember.engine.messages import EngineCoreOutput, EngineCoreRequest, EngineInfo, EngineStats
from ember.engine.setup import EngineSetup, build_engine_setup
from ember.errors import InvalidRequestError
from ember.spec import NoSpeculator
from ember.structured.manager import StructuredOutputManager
from ember.worker.model_runner import ModelRunnerOutput

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, cfg, setup: EngineSetup | None = None):
        self.cfg = cfg
        s = setup or build_engine_setup(cfg)
        self.setup = s
        self.runner = s.runner
        self.executor = s.executor  # the ranks running the model: every step goes through it (any TP size)
        self.scheduler = s.scheduler
        self.speculator = s.speculator or NoSpeculator()  # proposes drafts before schedule(), hears results after
        # grammar matchers: created, masked (a bitmask in the step's data) and advanced by this one manager
        self.structured = StructuredOutputManager(s.tokenizer, self.runner.vocab_size, sorted(set(s.eos_token_ids)))
        self.grammar = self.structured.backend  # the compiler (and its cache), for callers that validate specs
        self.stats_prompt_tokens = 0
        self.stats_generation_tokens = 0
        self.stats_draft_tokens = 0  # speculative tokens verified
        self.stats_accepted_tokens = 0  # of those, accepted

    @property
    def lora_manager(self):
        return getattr(self.runner, "lora_manager", None)

    def info(self) -> EngineInfo:
        manager = self.lora_manager
        return EngineInfo(max_model_len=self.setup.max_model_len, vocab_size=self.runner.vocab_size,
                          eos_token_ids=list(self.setup.eos_token_ids),
                          lora_names=manager.names if manager is not None else [], has_lora=manager is not None,
                          chat_template=self.setup.chat_template,
                          sampling_defaults=merge_sampling_defaults(self.setup.checkpoint.sampling_defaults,
                                                                    self.cfg.ember.sampling_defaults))

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue one sequence; raises an EmberError (InvalidRequestError, QueueFullError, ...) when refused."""
        params = req.sampling_params
        self.speculator.check(params)
        if req.lora_name is not None:
            manager = self.lora_manager
            if manager is None or req.lora_name not in manager.names:
                raise InvalidRequestError(f"LoRA adapter {req.lora_name!r} is not served here", param="model")
        seq = Request(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, sampling_params=params,
                      eos_token_ids=req.eos_token_ids, max_tokens=req.max_tokens, arrival_time=req.arrival_time,
                      cache_salt=req.cache_salt, lora_name=req.lora_name)
        if params.structured is not None:  # compiled once per spec (cached); a bad grammar is refused here
            seq.matcher = self.structured.new_matcher(params.structured)
        self.scheduler.add_request(seq)
        self.stats_prompt_tokens += seq.num_prompt_tokens

    def abort_requests(self, request_ids: list[str]) -> None:
        """Finish these sequences (client gone, stop string matched) and free their blocks now."""
        for rid in request_ids:
            if self.scheduler.abort_request(rid) is not None:
                self._forget(rid)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the main loop --------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        start = time.monotonic()
        spec = self.speculator.propose(self.scheduler.running)  # sets request.spec_token_ids
        sched_out = self.scheduler.schedule()
        num_before = {item.request.request_id: item.request.num_output_tokens for item in sched_out.scheduled}
        sched_out.grammar = self.structured.grammar_bitmask(sched_out)
        runner_out = self.executor.execute(sched_out, spec)  # also when empty: it frees finished rows
        self.scheduler.update(sched_out, runner_out.sampled_token_ids)
        self.speculator.observe(sched_out, runner_out.spec)
        return self._outputs(sched_out, runner_out, num_before, start)

    def _outputs(self, sched_out, runner_out: ModelRunnerOutput, num_before: dict[str, int],
                 start: float) -> list[EngineCoreOutput]:
        """One delta per scheduled sequence: the tokens update() kept (drafts past a stop are cut there)."""
        outputs = []
        for item in sched_out.scheduled:
            seq = item.request
            rid = seq.request_id
            new_ids = seq.output_token_ids[num_before[rid]:]  # a tail slice: this step's tokens only
            out = EngineCoreOutput(rid, new_ids, num_cached_tokens=seq.num_cached_tokens, step_start_time=start)
            logprobs = runner_out.logprobs.get(rid)
            if logprobs is not None:
                out.new_logprobs = logprobs[:len(new_ids)]
            prompt = runner_out.prompt_logprobs.get(rid)
            if prompt is not None:  # a chunk recomputed after a preemption: only what was not sent yet
                first, entries = prompt
                out.new_prompt_logprobs = entries[max(0, seq.num_prompt_logprobs - first):]
                seq.num_prompt_logprobs = max(seq.num_prompt_logprobs, first + len(entries))
            spec = runner_out.spec.get(rid)
            if spec is not None:
                out.num_draft_tokens, out.num_accepted_tokens = spec.num_draft_tokens, len(spec.accepted_nodes)
                self.stats_draft_tokens += out.num_draft_tokens
                self.stats_accepted_tokens += out.num_accepted_tokens
            self.stats_generation_tokens += len(new_ids)
            if self.structured.advance(seq, new_ids) and not seq.status.is_finished:
                self.scheduler.finish_request(rid, RequestStatus.FINISHED_STOPPED)  # the grammar is complete
            if seq.status.is_finished and seq.status != RequestStatus.FINISHED_ABORTED:
                out.finish_reason, out.stop_reason = seq.status.finish_reason, seq.stop_reason
                self._forget(rid)
            outputs.append(out)
        return outputs

    def _forget(self, rid: str) -> None:
        self.speculator.free(rid)  # the runner drops its row with the scheduler's finished_ids

    # ---- state reported to the front end ----------------------------------------------------------
    def stats(self) -> EngineStats:
        sched = self.scheduler
        bm = sched.block_manager
        return EngineStats(
            num_running=sched.num_running, num_waiting=sched.num_waiting, kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks, num_blocks=bm.num_blocks, block_size=bm.block_size,
            prefix_cache_queries=getattr(bm, "num_prefix_queries", 0), prefix_cache_hits=getattr(bm, "num_prefix_hits", 0),
            prompt_tokens_total=self.stats_prompt_tokens, generation_tokens_total=self.stats_generation_tokens,
            num_draft_tokens_total=self.stats_draft_tokens, num_accepted_tokens_total=self.stats_accepted_tokens,
            **self._lora_stats())

    def _lora_stats(self) -> dict:
        """The adapters running and waiting, for a gateway's LoRA-affinity routing (vllm:lora_requests_info)."""
        sched = self.scheduler
        if not sched.max_loras:
            return {}
        return {"max_loras": sched.max_loras,
                "running_lora_names": tuple(sorted({r.lora_name for r in sched.running if r.lora_name is not None})),
                "waiting_lora_names": tuple(sorted({r.lora_name for r in sched.waiting if r.lora_name is not None}))}

    # ---- control (LoRA at run time, health, shutdown) ------------------------------------------------
    def add_lora(self, name: str, path) -> list[str]:
        """Read and register an adapter (raises ember.lora.adapter.AdapterError); returns the served names."""
        self.lora_manager.add_adapter(name, path)
        return self.lora_manager.names

    def remove_lora(self, name: str) -> list[str]:
        self.lora_manager.remove_adapter(name)
        return self.lora_manager.names

    def check_health(self) -> None:
        """Raise EngineDeadError when a tensor-parallel worker rank is gone."""
        if self.setup.executor is not None:
            self.setup.executor.check_health()

    def dead_reason(self) -> str | None:
        return self.setup.executor.dead_reason() if self.setup.executor is not None else None

    @property
    def has_workers(self) -> bool:
        executor = self.setup.executor
        return executor is not None and executor.parallel.is_parallel

    def shutdown(self) -> None:
        """Stop the worker ranks, if any (a no-op with tensor_parallel_count 1)."""
        if self.setup.executor is not None:
            self.setup.executor.shutdown()
