"""LLMEngine: the synchronous engine, everything in one process (what `LLM` drives).

A front end (InputProcessor: tokenize and validate; OutputProcessor: fold deltas into RequestOutputs,
detokenize, stop strings, n > 1) around an EngineCore (scheduler, runner, KV cache), the same core the
server runs in a process of its own. A user request with `n` > 1 becomes n core sequences whose prompts
share KV blocks through the prefix cache.
"""

from __future__ import annotations

import logging
import time

from ember.engine.core import EngineCore
from ember.engine.output_processor import OutputProcessor
from ember.engine.processor import InputProcessor
from ember.engine.setup import EngineSetup, build_engine_setup
from ember.errors import InvalidRequestError
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, cfg, setup: EngineSetup | None = None):
        self.cfg = cfg
        self.setup = setup or build_engine_setup(cfg)
        self.core = EngineCore(cfg, self.setup)
        self.tokenizer = self.setup.tokenizer
        self.max_model_len = self.setup.max_model_len
        self.input_processor = InputProcessor(self.tokenizer, self.core.info())
        self.output_processor = OutputProcessor(self.tokenizer)

    # the core's parts, for benchmarks and tests that look inside an in-process engine
    @property
    def runner(self):
        return self.core.runner

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def grammar(self):
        return self.core.grammar

    @property
    def lora_names(self) -> list[str]:
        """LoRA adapters requests may name (configured ones, plus any loaded at run time)."""
        manager = self.core.lora_manager
        return manager.names if manager is not None else []

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, cache_salt: str | None = None,
                    lora_name: str | None = None) -> None:
        """Validate, then queue every sequence; on refusal nothing of the request stays queued."""
        if request_id in self.output_processor.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        self.input_processor.info.lora_names = self.lora_names
        prompt_text, prompt_ids, reqs = self.input_processor.process(request_id, prompt, params, arrival_time,
                                                                     cache_salt, lora_name)
        added = []
        try:
            for req in reqs:
                self.core.add_request(req)
                added.append(req.request_id)
        except Exception:
            self.core.abort_requests(added)
            raise
        self.output_processor.add_request(request_id, prompt_text, prompt_ids, params, reqs[0].eos_token_ids,
                                          reqs[0].arrival_time)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        out, seq_ids = self.output_processor.abort_request(request_id)
        self.core.abort_requests(seq_ids)
        return out

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests() or self.core.has_unfinished_requests()

    # ---- the main loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        deltas = self.core.step()
        processed = self.output_processor.process(deltas, time.monotonic())
        self.core.abort_requests(processed.abort_ids)  # stop strings matched here end the sequences there
        return processed.request_outputs

    # ---- the ranks running the model (ember.worker.executor) ----------------------------------
    def check_health(self) -> None:
        self.core.check_health()

    def dead_reason(self) -> str | None:
        return self.core.dead_reason()

    def shutdown(self) -> None:
        self.core.shutdown()
