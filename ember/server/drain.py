"""The SIGTERM drain: new requests are refused in OpenAI's shape, running ones get `ember.drain_timeout_s`
seconds to finish, and what still runs after that ends with an error the client can read, never a cut
connection.

`EmberServer` is uvicorn with that drain in front of uvicorn's own shutdown. On SIGTERM/SIGINT the draining
flag goes up at once (DrainingMiddleware answers new requests 503 `server_draining`, /health says 503) and
the server keeps listening, so a client or load balancer that has not yet heard of the drain gets that 503
rather than a refused connection. It waits for the in-flight requests up to the drain time; any left then
are stopped through `LiveStreams`: each engine request is aborted and its handler raises
`ServerShutdownError` (503 `server_shutdown`), which a stream sends as its last SSE event before `[DONE]`
(the Responses API as its `error` event) and a non-streaming request returns as its JSON body. Then
uvicorn's shutdown runs, with DRAIN_GRACE_S for those last events to go out; only a request stuck beyond
that (a client that stopped reading, a request outside the engine) is cancelled, which DrainingMiddleware
reports in one log line (and a 503 if nothing was sent yet). The process then exits with status 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn

from ember.server.errors import ServiceUnavailableError

logger = logging.getLogger("ember.server")

DRAIN_GRACE_S = 5.0  # after the drain time: stopped requests send their error event and close
_POLL_S = 0.05  # how often the drain looks for in-flight requests (uvicorn itself polls every 0.1 s)


class ServerShutdownError(ServiceUnavailableError):
    """The drain time ended before this request finished."""

    code = "server_shutdown"


class LiveStreams:
    """The server's running engine streams (OutputStreams between start and close), so that the end of the
    drain can stop them; once stopped, a stream that starts later is refused with the same error."""

    def __init__(self):
        self.streams: set = set()
        self.error: ServerShutdownError | None = None

    def add(self, stream) -> None:
        if self.error is not None:
            raise self.error
        self.streams.add(stream)

    def discard(self, stream) -> None:
        self.streams.discard(stream)

    def stop_all(self, error: ServerShutdownError) -> int:
        """Stop every running stream with `error` (and every later one); returns how many were running."""
        self.error = error
        streams = list(self.streams)
        for stream in streams:
            stream.stop(error)
        return len(streams)


class EmberServer(uvicorn.Server):
    """uvicorn with ember's drain (see the module docstring) before its shutdown. `ember_state` is the app's
    ServerState: its `is_draining` flag, `settings.drain_timeout_s` and `live_streams`."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.ember_state = state
        self.engine_dead_reason: str | None = None  # why the engine was dead when the shutdown began, if it was

    def handle_exit(self, sig, frame) -> None:
        # Not uvicorn's: it also records the signal and raises it again after the shutdown, so a clean drain
        # would end the process killed by SIGTERM (or with a KeyboardInterrupt traceback) instead of status 0.
        if not self.ember_state.is_draining:
            logger.info("signal %s: draining (new requests get 503, running ones get up to %g s)", signal.Signals(sig).name,
                        self.ember_state.settings.drain_timeout_s)
        self.ember_state.is_draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        await self.drain()
        dead_reason = getattr(self.ember_state.engine, "dead_reason", None)
        self.engine_dead_reason = dead_reason() if dead_reason is not None else None  # before the lifespan stops it on purpose
        await super().shutdown(sockets=sockets)

    async def drain(self) -> None:
        """Wait up to the drain time for in-flight requests, still listening (new ones get 503); then stop
        the ones left with ServerShutdownError."""
        state = self.ember_state
        state.is_draining = True  # also when the stop did not come from a signal (a dead engine, a test)
        timeout_s = state.settings.drain_timeout_s
        deadline = time.monotonic() + timeout_s
        while self.server_state.tasks and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        if not self.server_state.tasks:
            return
        error = ServerShutdownError(f"The server is shutting down and this request did not finish within its drain time "
                                    f"of {timeout_s:g} s (ember.drain_timeout_s).")
        num_stopped = state.live_streams.stop_all(error)
        logger.warning("drain time of %g s is over: ending %d running request(s) with a server_shutdown error", timeout_s,
                       num_stopped)
