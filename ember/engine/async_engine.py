"""AsyncLLM: the engine driven from asyncio (the server uses it).

The LLMEngine runs on one background thread (torch releases the GIL during the forward, so the event
loop stays responsive). Requests are tokenized and validated on the caller's side, then handed to the
engine thread through an inbox; outputs come back through per-request asyncio queues. Nothing but the
engine thread touches the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ember.engine.llm_engine import LLMEngine
from ember.errors import EmberError, EngineDeadError, QueueFullError, RequestTimeoutError
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

HEALTH_POLL_S = 0.5  # with worker ranks, how often the idle engine loop checks they are alive


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_draft_tokens_total: int = 0
    num_accepted_tokens_total: int = 0


class AsyncLLM:
    def __init__(self, cfg=None, engine: LLMEngine | None = None):
        if engine is None:
            from ember.config import load_config

            cfg = cfg if cfg is not None else load_config(None)
            engine = LLMEngine(cfg)
        self.engine = engine
        self.cfg = engine.cfg
        self.tokenizer = engine.tokenizer
        self.chat_template = engine.setup.chat_template
        self.max_model_len = engine.max_model_len
        self.served_model_name = self.cfg.served_model_id
        self.max_queue_size = self.cfg.ember.max_queue_size
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._num_pending_adds = 0  # adds in the inbox, not yet seen by the scheduler
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._dead: BaseException | None = None
        # tensor-parallel worker ranks: the idle loop wakes to check on them (ember.worker.executor)
        self._has_workers = getattr(getattr(engine, "setup", None), "executor", None) is not None and \
            engine.setup.executor.parallel.is_parallel

    @property
    def lora_names(self) -> list[str]:
        """The LoRA adapters requests may choose through `model` (configured, plus any loaded at run time)."""
        return self.engine.lora_names

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
        # callers still waiting (e.g. cancelled at the end of a drain) hear why, instead of hanging
        for rid in list(self._streams):
            self._deliver(rid, EngineDeadError("the engine is shutting down"))
        if self._thread is not None and not self._thread.is_alive():
            for rid in list(self.engine.groups):
                self.engine.abort_request(rid)
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()  # tensor-parallel worker ranks stop with the engine

    def is_healthy(self) -> bool:
        return self.dead_reason() is None

    def dead_reason(self) -> str | None:
        """Why the engine cannot generate (its loop died, a worker rank is gone), or None when it can."""
        if self._dead is not None:
            return f"the engine loop died: {type(self._dead).__name__}: {self._dead}"
        if self._thread is not None and not self._thread.is_alive():
            return "the engine loop has stopped"
        engine_reason = getattr(self.engine, "dead_reason", None)
        return engine_reason() if engine_reason is not None else None

    def stats(self) -> EngineStats:
        sched = self.engine.scheduler
        bm = sched.block_manager
        return EngineStats(
            num_running=sched.num_running, num_waiting=sched.num_waiting + self._num_pending_adds,
            kv_cache_usage=bm.usage, prefix_cache_queries=getattr(bm, "num_prefix_queries", 0),
            prefix_cache_hits=getattr(bm, "num_prefix_hits", 0),
            prompt_tokens_total=self.engine.stats_prompt_tokens,
            generation_tokens_total=self.engine.stats_generation_tokens,
            num_draft_tokens_total=getattr(self.engine, "stats_draft_tokens", 0),
            num_accepted_tokens_total=getattr(self.engine, "stats_accepted_tokens", 0))

    # ---- requests -------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str, *,
                       lora_name: str | None = None, deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        if self._thread is None:
            await self.start()
        if not self.is_healthy():
            raise EngineDeadError("the engine loop has stopped; the server cannot take requests")
        if request_id in self._streams:
            raise EmberError(f"request id {request_id!r} is already in use", param="request_id")
        waiting = self.engine.scheduler.num_waiting + self._num_pending_adds
        if waiting + params.n > self.max_queue_size:
            raise QueueFullError(f"the waiting queue is full ({self.max_queue_size} requests); retry later",
                                 retry_after=1.0)
        group = self.engine.make_group(request_id, prompt, params, lora_name=lora_name)
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        self._num_pending_adds += params.n
        self._inbox.put(("add", group))
        self._wake.set()
        finished = False
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(q.get(), timeout)
                except asyncio.TimeoutError:
                    raise RequestTimeoutError("the request's deadline passed before it finished; it was aborted",
                                              param="Request-Timeout-Ms") from None
                while not q.empty() and not isinstance(item, BaseException):
                    item = q.get_nowait()  # outputs are cumulative: skip to the newest
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # ---- the engine thread ----------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        q = self._streams.get(request_id)
        if q is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(q.put_nowait, item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._num_pending_adds -= len(arg.seqs)
                if arg.request_id not in self._streams:
                    continue  # the caller left before the engine saw it
                try:
                    self.engine.add_group(arg)
                except EmberError as exc:
                    self._deliver(arg.request_id, exc)
            else:
                self.engine.abort_request(arg)

    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                if self._has_workers:
                    self.engine.check_health()  # raises when a tensor-parallel worker rank is gone
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(HEALTH_POLL_S if self._has_workers else None)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as exc:  # the loop is dead: every waiting caller must hear it
            logger.exception("engine loop died")
            self._dead = exc
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"the engine loop died: {type(exc).__name__}: {exc}"))
