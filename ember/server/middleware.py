"""Pure-ASGI gates in front of the routes, outermost first: a catch-all that turns any escaped
exception into an opaque OpenAI-shaped 500; the API key (401); draining (503); the body-size bound
(413, decided before any JSON parsing). Pure ASGI (not BaseHTTPMiddleware) so that streaming and
client-disconnect signals pass through untouched."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Callable

from ember.server.errors import error_body
from ember.server.playground import PLAYGROUND_PATHS

logger = logging.getLogger("ember.server")

UNAUTHENTICATED_PATHS = frozenset({"/health"}) | PLAYGROUND_PATHS  # probes carry no key; the page holds no secret
DRAIN_EXEMPT_PATHS = frozenset({"/health", "/metrics"})  # /health itself says 503 while draining


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw + (headers or [])})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class _TrackedSend:
    """An ASGI `send` that remembers whether the response has started (headers sent: no error body can follow)."""

    def __init__(self, send):
        self.send = send
        self.started = False

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class CatchAllMiddleware:
    """Last line of defence: an unexpected exception becomes a 500 in OpenAI shape, no traceback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tracked = _TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 - the whole point
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not tracked.started:
                body = error_body("The server had an error while processing your request.", "internal_error", None, "internal_error")
                await send_json(send, 500, body)


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but /health, compared in constant time."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNAUTHENTICATED_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        if not hmac.compare_digest(given, self.expected):
            msg = "Incorrect API key provided." if given else "You didn't provide an API key. Pass it as 'Authorization: Bearer KEY'."
            body = error_body(msg, "invalid_request_error", None, "invalid_api_key")
            return await send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class DrainingMiddleware:
    """After SIGTERM, new requests get 503 while in-flight ones finish. What uvicorn still cancels at the very
    end (drain.DRAIN_GRACE_S after the drain time: a client that stopped reading, a request outside the engine)
    ends with one log line and, if nothing was sent yet, a 503 in OpenAI's shape, not a traceback."""

    def __init__(self, app, is_draining: Callable[[], bool]):
        self.app = app
        self.is_draining = is_draining

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] not in DRAIN_EXEMPT_PATHS and self.is_draining():
            body = error_body("The server is shutting down and accepts no new requests.", "service_unavailable", None, "server_draining")
            return await send_json(send, 503, body, [(b"connection", b"close")])
        tracked = _TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not self.is_draining():
                raise
            logger.warning("%s %s was still running at the end of the shutdown; its connection is closed",
                           scope.get("method"), scope.get("path"))
            if not tracked.started:
                body = error_body("The server shut down before this request finished.", "service_unavailable", None, "server_shutdown")
                await send_json(send, 503, body, [(b"connection", b"close")])


class BodyLimitMiddleware:
    """Bounds the request body: Content-Length is checked first, then the bytes actually received are
    counted (chunked uploads carry no length). The body is buffered here, so nothing downstream ever
    parses an over-long one; later receive() calls (disconnect) go straight to the server."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        # A refused body up to this size is read and dropped before the 413 goes out: closing a
        # connection with unread bytes makes the kernel reset it, and the client sees the reset.
        self.max_drain_bytes = 4 * max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await send_json(send, 400, error_body("Invalid Content-Length header.", "invalid_request_error", None, "invalid_header"))
                if declared > self.max_body_bytes:
                    return await self._too_large(receive, send, is_draining=declared <= self.max_drain_bytes)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body; nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await self._too_large(receive, send, is_draining=message.get("more_body", False), num_read=size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, receive, send, is_draining: bool, num_read: int = 0):
        while is_draining and num_read <= self.max_drain_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            num_read += len(message.get("body", b""))
            is_draining = message.get("more_body", False)
        msg = f"The request body is larger than the limit of {self.max_body_bytes} bytes (ember.max_body_bytes)."
        await send_json(send, 413, error_body(msg, "invalid_request_error", None, "request_too_large"), [(b"connection", b"close")])
