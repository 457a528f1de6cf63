"""The real server over the default model (SmolLM2-135M-Instruct, offline) on a loopback uvicorn,
shared by the whole directory, and the official `openai` client (sync and async) pointed at it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import openai
import pytest
from live_server import LiveServer, running

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent.parent / "structured"))  # structured_schemas.py


@pytest.fixture
def start_server():
    """start_server(app) -> a LiveServer for another app (a fake engine's), stopped after the test."""
    servers = []

    def start(app) -> LiveServer:
        server = LiveServer(app, stop_timeout_s=30.0)
        server.thread.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def live():
    from ember.config import load_config
    from ember.engine.async_engine import AsyncLLM
    from ember.server.app import create_app

    cfg = load_config(None, dtype="float32")
    engine = AsyncLLM(cfg)
    with running(LiveServer(create_app(engine, cfg), stop_timeout_s=30.0)) as server:
        yield server


@pytest.fixture(scope="session")
def server_state(live):
    """The app's ServerState (renderer, settings, engine)."""
    return live.server.config.app.state.ember


@pytest.fixture(scope="session")
def client(live):
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture
async def aclient(live):
    # closed inside the test's own event loop: a client left to the garbage collector closes its connections
    # later, on a loop that is gone ("Event loop is closed" in another test)
    async with openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture
def anyio_backend():
    return "asyncio"
