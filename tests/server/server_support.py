"""Fixtures for the server tests: a fake engine over a real tokenizer, apps built from a minimal
config, an httpx client over ASGI, and a live uvicorn on a pre-bound loopback socket (connections
queue on the socket until uvicorn accepts them, so no polling for readiness)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

from ember.server.app import create_app
from live_server import LiveServer, running
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


def live_server(app):
    """A context manager: `app` served over HTTP on a loopback port for the test's duration."""
    return running(LiveServer(app))


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
