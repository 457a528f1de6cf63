"""50 streaming clients against the real server, all cut off mid-stream: every engine request is
aborted and the KV cache (block manager and /metrics) returns to its baseline."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from e2e_server import async_wait_until, real_server, wait_until

NUM_CLIENTS = 50
# cannot finish on its own during the test (and 50 fit in the KV cache at once, their whole
# max_tokens reserved); with logprobs every token is a chunk, even one whose
# text is empty (a skipped special token once EOS is ignored)
LONG = {"max_tokens": 400, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server():
    with real_server() as s:
        yield s


def test_50_clients_cut_off_mid_stream_free_their_blocks(server):
    assert wait_until(server.is_idle)
    baseline, num_blocks = server.free_blocks()
    assert baseline == num_blocks and server.kv_usage() == 0.0
    all_started = asyncio.Event()
    num_started = 0
    seen_while_open = {}
    progress = {}  # client -> how far it got, for the failure message

    async def client(http: httpx.AsyncClient, i: int) -> int:
        nonlocal num_started
        if i % 2:
            messages = [{"role": "user", "content": f"Count from {i} upwards."}]
            path, body = "/v1/chat/completions", {"messages": messages, "logprobs": True, **LONG}
        else:
            path, body = "/v1/completions", {"prompt": f"{i}, {i + 1}, {i + 2},", "logprobs": 0, **LONG}
        num_chunks = 0
        progress[i] = "connecting"
        async with http.stream("POST", path, json=body) as resp:
            assert resp.status_code == 200
            progress[i] = "headers"
            lines = resp.aiter_lines()  # kept: a dropped iterator is finalized, which already closes the stream
            async for line in lines:
                if line.startswith("data: "):
                    assert line != "data: [DONE]"
                    num_chunks += 1
                    progress[i] = f"chunks={num_chunks}"
                    if num_chunks == 1 + i % 3:  # cut off after 1, 2 or 3 chunks
                        break
            num_started += 1
            if num_started == NUM_CLIENTS:
                all_started.set()
            await all_started.wait()  # every stream is open at once; leaving the block closes this one
        return num_chunks

    async def main():
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 5, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as http:
            tasks = [asyncio.ensure_future(client(http, i)) for i in range(NUM_CLIENTS)]
            await async_wait_until(lambda: all_started.is_set() or any(t.done() for t in tasks), timeout=90)
            stuck = {i: p for i, p in progress.items() if p != f"chunks={1 + i % 3}"}
            failed = [t.exception() for t in tasks if t.done()]
            assert all_started.is_set(), f"{num_started} streams started; failed: {failed[:3]}; stuck: {stuck}; {server.engine.stats()}"
            stats = server.engine.stats()
            seen_while_open.update(running=stats.num_running, free=stats.num_free_blocks)
            return await asyncio.gather(*tasks)

    chunks = asyncio.run(main())
    assert chunks == [1 + i % 3 for i in range(NUM_CLIENTS)]
    # all 50 were running, holding blocks, when their clients left
    assert seen_while_open["running"] == NUM_CLIENTS and seen_while_open["free"] < baseline
    assert wait_until(lambda: server.free_blocks()[0] == baseline), (
        f"{baseline - server.free_blocks()[0]} KV blocks still held after every client left")
    assert wait_until(server.is_idle)  # nothing running or waiting, /metrics kv usage back to 0
    assert server.engine.stats().num_running == 0

    # and the server serves on
    with server.client() as http:
        resp = http.post("/v1/completions", json={"prompt": "1, 2, 3,", "max_tokens": 4, "ignore_eos": True})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4


def test_disconnect_storm_100_streams_half_dropped(server):
    """100 streams at once through the engine-core process: every other client leaves after its first chunk,
    the rest read to [DONE]; the dropped ones are aborted in the core and the KV cache returns to baseline."""
    assert wait_until(server.is_idle)
    baseline, _ = server.free_blocks()

    async def client(http: httpx.AsyncClient, i: int) -> str:
        drop = i % 2 == 0
        body = {"prompt": f"{i}, {i + 1},", "stream": True, "ignore_eos": True, "max_tokens": 200 if drop else 4}
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            finish = None
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if drop:
                    return "dropped"
                if line == "data: [DONE]":
                    return finish
                finish = json.loads(line[6:])["choices"][0].get("finish_reason") or finish
        return "cut"

    async def main():
        limits = httpx.Limits(max_connections=110, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=600) as http:  # a bound for loaded CI
            return await asyncio.gather(*(client(http, i) for i in range(100)))

    results = asyncio.run(main())
    assert results == ["dropped" if i % 2 == 0 else "length" for i in range(100)]
    assert wait_until(lambda: server.free_blocks()[0] == baseline, timeout=120), (
        f"{baseline - server.free_blocks()[0]} KV blocks still held after the storm")
    assert wait_until(server.is_idle)


def test_a_killed_engine_core_makes_health_503_naming_it(server):
    """Last in this module (it ends the server's engine): the core is a process of its own; when it dies the
    front end says so on /health and in dead_reason (which the server's watchdog prints as it exits)."""
    import os
    import signal

    pid = server.engine.client.proc.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: httpx.get(f"{server.url}/health", timeout=10).status_code == 503)
    assert server.engine.dead_reason() == f"the engine core process (pid {pid}) exited with code -9"
    with server.client() as http:
        assert http.post("/v1/completions", json={"prompt": "1, 2,", "max_tokens": 2}).status_code == 503
