"""The real server over the default model (SmolLM2-135M-Instruct, offline) on a loopback uvicorn,
shared by the whole directory, and the official `openai` client (sync and async) pointed at it."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

import openai
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent.parent / "structured"))  # structured_schemas.py


class LiveServer:
    """uvicorn on a pre-bound loopback socket: requests queue on it until uvicorn accepts them."""

    def __init__(self, app):
        from ember.server.app import build_server

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = build_server(app, "127.0.0.1", self.sock.getsockname()[1], log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def start_server():
    """start_server(app) -> a LiveServer for another app (a fake engine's), stopped after the test."""
    servers = []

    def start(app) -> LiveServer:
        server = LiveServer(app)
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
    server = LiveServer(create_app(engine, cfg))
    server.thread.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_state(live):
    """The app's ServerState (renderer, settings, engine)."""
    return live.server.config.app.state.ember


@pytest.fixture(scope="session")
def client(live):
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture
def aclient(live):
    return openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture
def anyio_backend():
    return "asyncio"
