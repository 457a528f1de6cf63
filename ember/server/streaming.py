"""The server's side of the engine call: start, merge, deadline, disconnect, abort.

`OutputStream` drives `engine.generate` for the prompts of one HTTP request (one prompt: the engine's
iterator is awaited directly, no task or asyncio.wait per output). `start()` waits for the
first output of every prompt, so that queue-full (429), context (400) and dead-engine (503) errors
surface before any response byte is sent; iteration then merges the prompts' outputs. Whatever ends
it (done, error, deadline, client gone, shutdown) `close()` closes the engine iterators and calls
`engine.abort` for unfinished requests, shielded from cancellation, so their KV blocks are freed.
Between `start()` and `close()` a stream is in the server's `LiveStreams`: at the end of a drain
`stop(error)` interrupts the wait in progress (or the next one) and makes the stream raise `error`.

`run_until_disconnect` races a non-streaming request against the client leaving; `SSEResponse`
does the same for streams (Starlette's listener, whatever the ASGI spec version) and always closes
its body iterator."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import anyio
from starlette.responses import StreamingResponse

from ember.sampling_params import SamplingParams
from ember.server.errors import RequestTimeoutError, ember_error_body

logger = logging.getLogger("ember.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"
_background: set[asyncio.Task] = set()  # cleanup tasks that must outlive a cancelled request


class ClientDisconnected(Exception):
    """The client went away before its response was sent."""


@dataclass
class Job:
    """One engine request: one prompt of an HTTP request."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    lora_name: str | None = None


class OutputStream:
    def __init__(self, engine, jobs: list[Job], deadline: float | None = None, timeout_s: float | None = None, timer=None,
                 live=None):
        self.engine = engine
        self.live = live  # drain.LiveStreams: holds the stream while it runs, so a server shutdown can stop it
        self.timer = timer  # metrics.RequestTimer: told the running output-token count
        self.jobs = jobs
        self.deadline = deadline  # time.monotonic() value
        self.timeout_s = timeout_s
        self.generators = [None] * len(jobs)
        self.finished = [False] * len(jobs)
        self.num_tokens = [0] * len(jobs)
        self.firsts: list[Any] = []
        self.closed = False
        self.stop_error: BaseException | None = None  # set by stop(): raised instead of the next output
        self._wait_scope: asyncio.Timeout | None = None  # the wait in progress, which stop() ends at once

    async def start(self) -> None:
        """Submit every prompt and wait for its first output; engine refusals are raised here."""
        try:
            if self.live is not None:
                self.live.add(self)  # refused (raises) once the server's drain time is over
            for i, job in enumerate(self.jobs):
                it = self.engine.generate(job.prompt, job.params, job.request_id, lora_name=job.lora_name, deadline=self.deadline)
                if inspect.isawaitable(it):  # an `async def` returning an iterator works too
                    it = await it
                self.generators[i] = it.__aiter__()
            if len(self.jobs) == 1:  # the common case: no task, no asyncio.wait
                results = [await self._bounded(self._next(0))]
            else:
                results = await self._wait([asyncio.ensure_future(self._next(i)) for i in range(len(self.jobs))], all_done=True)
        except BaseException:
            await self.close()
            raise
        self.firsts = [r for r in results if r[1] is not None]

    async def __aiter__(self) -> AsyncIterator[tuple[int, Any]]:
        if len(self.jobs) == 1:
            async for item in self._iter_one():
                yield item
            return
        pending = []
        try:
            for i, out in self.firsts:
                yield i, out
                if not self.finished[i]:
                    pending.append(asyncio.ensure_future(self._next(i)))
            while pending:
                done = await self._wait(pending, all_done=False)
                pending = [t for t in pending if not t.done()]
                for i, out in done:
                    if out is None:
                        continue
                    yield i, out
                    if not self.finished[i]:
                        pending.append(asyncio.ensure_future(self._next(i)))
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _iter_one(self) -> AsyncIterator[tuple[int, Any]]:
        """One prompt: await its iterator directly (it hands over the newest output, coalesced)."""
        for item in self.firsts:
            yield item
        while not self.finished[0]:
            i, out = await self._bounded(self._next(0))
            if out is not None:
                yield i, out

    async def _bounded(self, awaitable):
        """Await `awaitable` within the deadline, unless stop() comes first."""
        if self.stop_error is not None:
            awaitable.close()
            raise self.stop_error
        delay = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        try:
            async with asyncio.timeout(delay) as scope:
                self._wait_scope = scope
                return await awaitable
        except TimeoutError:
            if self.stop_error is not None:
                raise self.stop_error from None
            raise self._timeout_error() from None
        finally:
            self._wait_scope = None

    def stop(self, error: BaseException) -> None:
        """End the stream with `error` (the server's drain time is over): the wait for the next output
        is cut short, the iteration raises `error`, and close() aborts the engine requests."""
        self.stop_error = error
        if self._wait_scope is not None and not self._wait_scope.expired():  # an expired one raises on its own
            self._wait_scope.reschedule(asyncio.get_running_loop().time())  # fires on the loop's next turn

    async def _next(self, i: int):
        try:
            out = await self.generators[i].__anext__()
        except StopAsyncIteration:
            self.finished[i] = True
            return i, None
        if self.timer is not None:
            self.num_tokens[i] = sum(len(o.token_ids) for o in out.outputs)
            self.timer.on_tokens(sum(self.num_tokens))
        if out.finished:
            self.finished[i] = True
            if self._expired() and any(o.finish_reason == "abort" for o in out.outputs):
                raise self._timeout_error()
        return i, out

    async def _wait(self, tasks: list[asyncio.Future], all_done: bool) -> list:
        when = asyncio.FIRST_EXCEPTION if all_done else asyncio.FIRST_COMPLETED
        try:
            done, _ = await self._bounded(asyncio.wait(tasks, return_when=when))
        except BaseException:  # the deadline, stop() or the caller's cancellation
            await _cancel_all(tasks)
            raise
        failed = [t for t in done if not t.cancelled() and t.exception() is not None]
        if failed:
            await _cancel_all(tasks)
            raise failed[0].exception()
        return [t.result() for t in tasks if t in done]

    def _expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _timeout_error(self) -> RequestTimeoutError:
        ms = round((self.timeout_s or 0) * 1000)
        return RequestTimeoutError(f"The request did not finish within its deadline of {ms} ms (Request-Timeout-Ms / X-Request-Timeout).")

    async def close(self) -> None:
        """Close the engine iterators and abort what did not finish; runs to the end even when the
        caller is being cancelled."""
        if self.closed:
            return
        self.closed = True
        if self.live is not None:
            self.live.discard(self)
        task = asyncio.ensure_future(self._cleanup())
        _background.add(task)
        task.add_done_callback(_background.discard)
        with anyio.CancelScope(shield=True):
            await asyncio.shield(task)

    async def _cleanup(self) -> None:
        for i, gen in enumerate(self.generators):
            if gen is None:
                continue
            try:
                await gen.aclose()
            except Exception:  # noqa: BLE001 - cleanup of one prompt must not stop the others
                logger.debug("closing the engine iterator of %s failed", self.jobs[i].request_id, exc_info=True)
            if not self.finished[i]:
                try:
                    await self.engine.abort(self.jobs[i].request_id)
                except Exception:  # noqa: BLE001
                    logger.warning("aborting %s failed", self.jobs[i].request_id, exc_info=True)

    async def collect(self) -> list[Any]:
        """Run to the end; the last output of each prompt, in prompt order."""
        last: list[Any] = [None] * len(self.jobs)
        try:
            await self.start()
            async for i, out in self:
                last[i] = out
        finally:
            await self.close()
        return last


async def _cancel_all(tasks) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(coro, receive):
    """Await `coro` unless the client disconnects first; then cancel it (its finally blocks abort the
    engine requests) and raise ClientDisconnected."""
    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientDisconnected()
    return work.result()


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_error(exc: BaseException) -> str:
    """An error after the stream started: an SSE event with OpenAI's error body (then [DONE])."""
    _, body = ember_error_body(exc)
    return sse(body)


class SSEResponse(StreamingResponse):
    """A text/event-stream response that notices a client leaving whatever the server's ASGI spec
    version, and always closes its body iterator (which aborts the engine request)."""

    media_type = "text/event-stream"

    def __init__(self, content, headers: dict | None = None):
        super().__init__(content, headers={**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-send
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await wait_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
