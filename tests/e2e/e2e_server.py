"""The real server for end-to-end tests: the default model (SmolLM2-135M-Instruct) in a real
AsyncLLM (its engine core in a process of its own), served by uvicorn on a thread over a pre-bound loopback socket (connections queue on the
socket until uvicorn accepts them, so no polling for readiness), as tests/server/conftest.py does
with a fake engine. Also bounded polling, the only way these tests wait for a condition."""

from __future__ import annotations

import os
import time
from typing import Callable

import httpx

from ember.config import load_config
from ember.engine.async_engine import AsyncLLM
from ember.server.app import create_app

from live_server import LiveServer, running

os.environ.setdefault("HF_HUB_OFFLINE", "1")

API_KEY = "e2e-key"
POLL_TIMEOUT_S = 30.0  # a bound on waiting for a condition, never a synchronization sleep


class RealServer(LiveServer):
    """uvicorn + the real engine; `url` is the server root (the OpenAI base URL is url + "/v1")."""

    def __init__(self, **overrides):
        self.cfg = load_config(None, **{"dtype": "bfloat16", "max_seq_len": 1024, **overrides})
        self.engine = AsyncLLM(self.cfg)
        self.app = create_app(self.engine, self.cfg)
        super().__init__(self.app, stop_timeout_s=30.0)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.cfg.ember.api_key}"} if self.cfg.ember.api_key else {}

    def free_blocks(self) -> tuple[int, int]:
        """(free KV blocks, all KV blocks) as the engine core last reported them (it runs in its own process)."""
        stats = self.engine.stats()
        return stats.num_free_blocks, stats.num_blocks

    @property
    def model(self) -> str:
        return self.engine.served_model_name

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, **kw)

    def kv_usage(self) -> float:
        """ember_kv_cache_usage_perc as /metrics reports it."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        line = next(li for li in text.splitlines() if li.startswith("ember_kv_cache_usage_perc "))
        return float(line.split()[1])

    def is_idle(self) -> bool:
        """No request running or waiting, every KV block free, and /metrics agrees."""
        stats = self.engine.stats()
        return (stats.num_running == 0 and stats.num_waiting == 0
                and stats.num_free_blocks == stats.num_blocks and self.kv_usage() == 0.0)


def real_server(**overrides):
    """A context manager: the real server, started, stopped at the end."""
    return running(RealServer(**overrides))


def wait_until(condition: Callable[[], bool], timeout: float = POLL_TIMEOUT_S, interval: float = 0.05) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


async def async_wait_until(condition: Callable[[], bool], timeout: float = POLL_TIMEOUT_S, interval: float = 0.05) -> bool:
    """`wait_until` for a test running on an event loop (the loop keeps serving its streams)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
