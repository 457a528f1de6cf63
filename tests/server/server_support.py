"""Fixtures for the server tests: a fake engine over a real tokenizer, apps built from a minimal
config, an httpx client over ASGI, and a live uvicorn on a pre-bound loopback socket (connections
queue on the socket until uvicorn accepts them, so no polling for readiness)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from types import SimpleNamespace

import httpx
import pytest

from ember.server.app import build_server, create_app
from server_fakes import FakeEngine, make_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def engine(tokenizer):
    return FakeEngine(tokenizer)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def make_cfg(request_default_max_tokens=None, limits=None, **ember):
    """A stand-in for EngineConfig with the same layout: cfg.ember.*, cfg.ember.limits.*, cfg.trt_llm.runtime.*."""
    return SimpleNamespace(
        ember=SimpleNamespace(limits=SimpleNamespace(**(limits or {})), **ember),
        trt_llm=SimpleNamespace(runtime=SimpleNamespace(request_default_max_tokens=request_default_max_tokens)),
    )


def asgi_client(app, **headers) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers)


@pytest.fixture
def client(engine):
    """An ASGI client over a default app; a second app with other settings: asgi_client(create_app(...))."""
    return asgi_client(create_app(engine, make_cfg()))


class LiveServer:
    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = build_server(app, "127.0.0.1", self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@contextlib.contextmanager
def live_server(app):
    server = LiveServer(app)
    server.thread.start()
    try:
        yield server
    finally:
        if server.thread.is_alive():
            server.stop()


def parse_sse(text: str) -> list:
    """SSE body -> list of decoded `data:` payloads ("[DONE]" kept as a string)."""
    events = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
