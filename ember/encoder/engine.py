"""`EncoderEngine`: the engine behind an encoder config, driven from asyncio like AsyncLLM.

Requests submit whole sequences (`encode`); a background thread forms batches under the config's token
budget (`build.max_num_tokens`) and batch size (`build.max_batch_size`), oldest first, runs one forward
per batch and hands each sequence its row. No KV cache: a sequence is finished by the forward that sees
it, so the scheduler's job reduces to admission by tokens; that loop is `_next_batch` (about 20 lines).
A request whose caller went away (client disconnect) is dropped before its batch runs."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass

import torch

from ember.encoder.runner import EncoderInput
from ember.encoder.setup import build_encoder_setup
from ember.errors import EngineDeadError, InvalidRequestError, QueueFullError

logger = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0  # embeddings/s and tokens/s on /metrics are averaged over this window


@dataclass
class _Work:
    item: EncoderInput
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def is_cancelled(self) -> bool:
        return self.future.done()


@dataclass
class EncoderStats:
    """What /metrics reads (names shared with the generation engine's stats where they mean the same)."""

    num_running: int
    num_waiting: int
    prompt_tokens_total: int  # tokens encoded since start
    embeddings_total: int  # sequences encoded since start (embeddings, or classified inputs)
    embeddings_per_second: float  # over the last RATE_WINDOW_S
    tokens_per_second: float


class EncoderEngine:
    """Embeds or classifies token sequences in batches on a background thread."""

    def __init__(self, cfg, setup=None):
        self.cfg = cfg
        self.setup = setup or build_encoder_setup(cfg)
        s = self.setup
        self.tokenizer, self.spec, self.pooling = s.tokenizer, s.spec, s.pooling
        self.max_model_len, self.hidden_size = s.max_model_len, s.hidden_size
        self.served_model_name = cfg.served_model_id
        self.chat_template = None
        self.lora_names: list[str] = []
        build = cfg.trt_llm.build
        self.max_num_tokens = max(build.max_num_tokens, s.max_model_len)  # one whole input always fits a batch
        self.max_batch_size = build.max_batch_size
        self.max_queue_size = cfg.ember.max_queue_size * build.max_batch_size  # sequences, not requests
        self._queue: collections.deque[_Work] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead_reason: str | None = None
        self._num_running = 0
        self._tokens_total = 0
        self._embeddings_total = 0
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque()  # (end time, sequences, tokens)

    # ---- the interface the server uses (as AsyncLLM's) ----
    @property
    def task(self) -> str:
        return self.spec.task

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ember-encoder", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def is_healthy(self) -> bool:
        return self._dead_reason is None and (self._thread is None or self._thread.is_alive())

    def dead_reason(self) -> str | None:
        return self._dead_reason

    def generate(self, *args, **kwargs):
        raise InvalidRequestError(f"{self.served_model_name} is an encoder (base_model {self.cfg.trt_llm.build.base_model}); "
                                  "it serves /v1/embeddings, /rerank and /predict, not text generation.", param="model")

    def stats(self) -> EncoderStats:
        with self._cond:
            now = time.monotonic()
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            seqs = sum(r[1] for r in self._recent)
            toks = sum(r[2] for r in self._recent)
            return EncoderStats(self._num_running, len(self._queue), self._tokens_total, self._embeddings_total,
                                seqs / RATE_WINDOW_S, toks / RATE_WINDOW_S)

    async def encode(self, items: list[EncoderInput]) -> torch.Tensor:
        """Rows for `items` ([N, D] float32: embeddings or logits), in order. Cancelling drops the unrun ones."""
        if not self.is_healthy():
            raise EngineDeadError("The encoder loop is not running.")
        loop = asyncio.get_running_loop()
        work = [_Work(item, loop.create_future(), loop) for item in items]
        with self._cond:
            if len(self._queue) + len(work) > self.max_queue_size:
                raise QueueFullError(f"The queue holds {len(self._queue)} inputs waiting (limit {self.max_queue_size}); retry later.")
            self._queue.extend(work)
            self._cond.notify()
        try:
            rows = await asyncio.gather(*(w.future for w in work))
        finally:
            for w in work:
                if not w.future.done():
                    w.future.cancel()
        return torch.stack(rows)

    # ---- the engine side ----
    def _next_batch(self) -> list[_Work]:
        """Oldest first, while the batch stays within max_num_tokens and max_batch_size (the first always fits)."""
        batch: list[_Work] = []
        num_tokens = 0
        while self._queue and len(batch) < self.max_batch_size:
            w = self._queue[0]
            if w.is_cancelled():
                self._queue.popleft()
                continue
            n = len(w.item.token_ids)
            if batch and num_tokens + n > self.max_num_tokens:
                break
            batch.append(self._queue.popleft())
            num_tokens += n
        return batch

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        break
                    batch = self._next_batch()
                    self._num_running = len(batch)
                if batch:
                    self._run(batch)
        except BaseException as exc:  # noqa: BLE001 - the engine is dead; waiting callers hear it
            self._dead_reason = f"{type(exc).__name__}: {exc}"
            logger.exception("encoder loop died")
        finally:
            with self._cond:
                waiting, self._queue = list(self._queue), collections.deque()
            for w in waiting:
                _resolve(w, exc=EngineDeadError("The encoder engine stopped."))

    def _run(self, batch: list[_Work]) -> None:
        try:
            out = self.setup.runner.run([w.item for w in batch])  # [B, D]
        except Exception as exc:  # noqa: BLE001 - one batch failed (e.g. out of memory); its requests get the error
            logger.exception("encoder batch of %d failed", len(batch))
            for w in batch:
                _resolve(w, exc=exc)
            return
        num_tokens = sum(len(w.item.token_ids) for w in batch)
        with self._cond:
            self._num_running = 0
            self._tokens_total += num_tokens
            self._embeddings_total += len(batch)
            self._recent.append((time.monotonic(), len(batch), num_tokens))
        for w, row in zip(batch, out):
            _resolve(w, row=row)


def _resolve(w: _Work, row=None, exc: BaseException | None = None) -> None:
    def settle():
        if not w.future.done():
            if exc is not None:
                w.future.set_exception(exc)
            else:
                w.future.set_result(row)

    try:
        w.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's event loop is closed
        pass
