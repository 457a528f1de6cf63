"""AsyncLLM: the front end the server drives from asyncio. The engine core runs elsewhere: in its own process
(`AsyncLLM(cfg)`, ember.engine.core_proc), or on a thread for an in-process LLMEngine (`AsyncLLM(engine=...)`).

This side owns tokenization and validation (InputProcessor), the admission counter behind 429s, and
detokenization, stop strings and n > 1 grouping (OutputProcessor). The core sends deltas with its stats;
one reader on the event loop (the socket's fd) folds them in and hands each request its newest cumulative
RequestOutput. A request's consumer waits only when nothing new is there (no future per token). Nothing here
reads the core's objects: what /metrics shows arrives with the outputs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator

from ember.engine.core_client import ProcessCoreClient, ThreadCoreClient
from ember.engine.messages import EngineCoreOutputs, EngineStats, ErrorInfo
from ember.engine.output_processor import OutputProcessor
from ember.engine.processor import InputProcessor, seq_ids
from ember.errors import EmberError, EngineDeadError, InvalidRequestError, QueueFullError, RequestTimeoutError
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineStats"]


class _Stream:
    """One request's mailbox: only the newest output is kept (outputs are cumulative), or the error."""

    __slots__ = ("latest", "event")

    def __init__(self):
        self.latest: RequestOutput | BaseException | None = None
        self.event = asyncio.Event()

    def put(self, item) -> None:
        if not isinstance(self.latest, BaseException):
            self.latest = item
            self.event.set()

    async def get(self):
        while self.latest is None:
            self.event.clear()
            await self.event.wait()
        item, self.latest = self.latest, None
        return item


class AsyncLLM:
    def __init__(self, cfg=None, engine=None):
        if engine is not None:  # an in-process LLMEngine: its core runs on a thread of this process
            self.cfg = engine.cfg
            self.tokenizer = engine.tokenizer
            self.client = ThreadCoreClient(engine)
        else:
            from ember.checkpoint import load_checkpoint, resolve_checkpoint_path
            from ember.config import load_config

            self.cfg = cfg if cfg is not None else load_config(None)
            self.client = ProcessCoreClient(self.cfg)  # loads the model in its own process meanwhile
            ckpt = load_checkpoint(resolve_checkpoint_path(self.cfg.trt_llm.build.checkpoint_repository))
            self.tokenizer = ckpt.load_tokenizer()
        self.engine = engine
        info = self.client.info
        self.chat_template = info.chat_template
        self.sampling_defaults = info.sampling_defaults  # for the sampling fields a request leaves out
        self.max_model_len = info.max_model_len
        self.served_model_name = self.cfg.served_model_id
        self.max_queue_size = self.cfg.ember.max_queue_size
        self.has_lora = info.has_lora
        self.input_processor = InputProcessor(self.tokenizer, info)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._grammar = None
        self._streams: dict[str, _Stream] = {}
        self._queued: dict[str, str] = {}  # sequence id -> request id, sent to the core and not yet scheduled
        self._stats = EngineStats()
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._is_started = False
        self._dead: str | None = None

    @property
    def lora_names(self) -> list[str]:
        """The LoRA adapters requests may choose through `model` (configured, plus any loaded at run time)."""
        return list(self.input_processor.info.lora_names)

    @property
    def grammar(self):
        """A grammar compiler on this side, so a bad schema is a 400 before anything reaches the core."""
        if self._grammar is None:
            from ember.structured.backend import GrammarBackend

            info = self.input_processor.info
            self._grammar = GrammarBackend(self.tokenizer, info.vocab_size, sorted(set(info.eos_token_ids)))
        return self._grammar

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self._is_started:
            self._is_started = True
            self.client.start(asyncio.get_running_loop(), self._on_message)

    async def shutdown(self) -> None:
        await self.client.close()
        for rid in list(self._streams):  # callers still waiting (e.g. cancelled at the end of a drain) hear why
            self._streams[rid].put(EngineDeadError("the engine is shutting down"))
        if self.engine is not None:  # the core's thread has stopped: nothing of this front end's may stay queued
            self.engine.core.abort_requests(list(self.engine.core.scheduler.requests))
            self.engine.shutdown()  # tensor-parallel worker ranks stop with the engine

    def is_healthy(self) -> bool:
        return self.dead_reason() is None

    def dead_reason(self) -> str | None:
        """Why the engine cannot generate (its core died, a worker rank is gone), or None when it can."""
        return self._dead or self.client.dead_reason()

    def stats(self) -> EngineStats:
        """The core's stats as of its last message; waiting counts what this side sent and it has not yet seen."""
        s = self._stats
        return EngineStats(**{**s.__dict__, "num_waiting": max(s.num_waiting, len(self._queued))})

    # ---- requests -------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str, *,
                       lora_name: str | None = None, deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        if not self._is_started:
            await self.start()
        if not self.is_healthy():
            raise EngineDeadError("the engine core has stopped; the server cannot take requests")
        if request_id in self._streams:
            raise EmberError(f"request id {request_id!r} is already in use", param="request_id")
        if len(self._queued) + params.n > self.max_queue_size:  # the 429 counter lives here
            raise QueueFullError(f"the waiting queue is full ({self.max_queue_size} requests); retry later",
                                 retry_after=1.0)
        prompt_text, prompt_ids, reqs = self.input_processor.process(request_id, prompt, params, lora_name=lora_name)
        stream = self._streams[request_id] = _Stream()
        self.output_processor.add_request(request_id, prompt_text, prompt_ids, params, reqs[0].eos_token_ids,
                                          reqs[0].arrival_time)
        for req in reqs:
            self._queued[req.request_id] = request_id
        self.client.send("add", reqs)
        finished = False
        try:
            while True:
                if deadline is None:
                    item = await stream.get()
                else:
                    try:
                        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                            item = await stream.get()
                    except TimeoutError:
                        raise RequestTimeoutError("the request's deadline passed before it finished; it was aborted",
                                                  param="Request-Timeout-Ms") from None
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            self._unqueue(request_id, params.n)
            if not finished:
                self._abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        _, ids = self.output_processor.abort_request(request_id)
        if ids:
            self.client.send("abort", ids)

    def _unqueue(self, request_id: str, n: int) -> None:
        for sid in seq_ids(request_id, n):
            self._queued.pop(sid, None)

    # ---- run-time LoRA (ember.lora.routes) -------------------------------------------------------
    async def add_lora(self, name: str, path) -> None:
        self.input_processor.info.lora_names = await self._call("add_lora", name, path)

    async def remove_lora(self, name: str) -> None:
        self.input_processor.info.lora_names = await self._call("remove_lora", name)

    async def _call(self, method: str, *args):
        if not self._is_started:
            await self.start()
        call_id = next(self._call_ids)
        future = self._calls[call_id] = asyncio.get_running_loop().create_future()
        self.client.send("call", (call_id, method, args))
        return await future

    # ---- the core's messages, on the event loop ----------------------------------------------------
    def _on_message(self, kind: str, payload) -> None:
        if kind == "outputs":
            self._on_outputs(payload)
        elif kind == "reply":
            call_id, error, value = payload
            future = self._calls.pop(call_id, None)
            if future is not None and not future.done():
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(InvalidRequestError(error.message, param="lora_path")
                                         if error.kind == "AdapterError" else error.to_exception())
        elif kind == "dead":
            self._dead = str(payload)
            logger.error("engine core died: %s", self._dead)
            for rid in list(self._streams):
                self._streams[rid].put(EngineDeadError(f"the engine died: {self._dead}"))
            for future in self._calls.values():
                if not future.done():
                    future.set_exception(EngineDeadError(f"the engine died: {self._dead}"))

    def _on_outputs(self, msg: EngineCoreOutputs) -> None:
        if msg.stats is not None:
            self._stats = msg.stats
        for rid, error in msg.errors:
            request_id = self._queued.get(rid, rid)
            stream = self._streams.get(request_id)
            self._abort(request_id)
            if stream is not None:
                stream.put(error.to_exception() if isinstance(error, ErrorInfo) else error)
        for out in msg.outputs:  # a scheduled sequence is no longer waiting
            self._queued.pop(out.request_id, None)
        processed = self.output_processor.process(msg.outputs, time.monotonic())
        if processed.abort_ids:
            self.client.send("abort", processed.abort_ids)
        for out in processed.request_outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
