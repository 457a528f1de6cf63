"""A full waiting queue on the real server (ember.max_queue_size=2, max_batch_size=1): one request
runs, two wait, the next ones get 429 with Retry-After in OpenAI's shape (streaming or not, and as
the SDK's RateLimitError), and the server recovers both when the load drains and when it is aborted."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from e2e_server import async_wait_until, real_server, wait_until

CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "Tell me a story."}]
# runs until its client leaves; logprobs make every token a chunk (see test_e2e_abort.py)
LONG = {"messages": MSGS, "max_tokens": 400, "ignore_eos": True, "stream": True, "logprobs": True}
SHORT = {"messages": MSGS, "max_tokens": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    with real_server(max_queue_size=2, max_batch_size=1) as s:
        yield s


def assert_queue_full(resp: httpx.Response) -> None:
    assert resp.status_code == 429, resp.text
    assert int(resp.headers["retry-after"]) >= 1
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "rate_limit_error" and err["code"] == "queue_full" and err["message"]


async def fill_queue(server, http: httpx.AsyncClient, waiting_body: dict):
    """Start one long stream (running) and two requests that wait behind it. Returns the open
    stream's context and the two waiting tasks."""
    ctx = http.stream("POST", CHAT, json=LONG)
    resp = await ctx.__aenter__()
    assert resp.status_code == 200
    lines = resp.aiter_lines()
    assert (await anext(lines)).startswith("data: ")  # the stream is running: it holds the one batch slot
    waiting = [asyncio.ensure_future(http.post(CHAT, json=waiting_body)) for _ in range(2)]
    assert await async_wait_until(lambda: server.engine.stats().num_waiting == 2)
    return ctx, lines, waiting


async def check_refused(server, http: httpx.AsyncClient) -> None:
    assert_queue_full(await http.post(CHAT, json=SHORT))
    assert_queue_full(await http.post(CHAT, json={**SHORT, "stream": True}))  # refused before any stream byte
    assert_queue_full(await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}))

    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as sdk:
        with pytest.raises(openai.RateLimitError) as exc:
            await sdk.chat.completions.create(model=server.model, messages=MSGS, max_tokens=2)
    assert exc.value.code == "queue_full"
    metrics = (await http.get("/metrics")).text
    assert 'ember_request_errors_total{status="429"}' in metrics


def test_queue_full_then_drains(server):
    """The waiting requests are short: once the running stream is cut off they run to the end."""

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            ctx, lines, waiting = await fill_queue(server, http, SHORT)
            await check_refused(server, http)
            await ctx.__aexit__(None, None, None)  # the running client leaves; the queue drains
            done = await asyncio.gather(*waiting)
            assert [r.status_code for r in done] == [200, 200]
            assert all(r.json()["usage"]["completion_tokens"] == 4 for r in done)
            del lines

    asyncio.run(main())
    assert wait_until(server.is_idle)
    assert httpx.post(f"{server.url}{CHAT}", json=SHORT, timeout=60).status_code == 200


def test_queue_full_then_aborted(server):
    """The waiting requests are long too: every client leaves, queued ones included, and the server
    is idle again with every KV block free."""

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            ctx, lines, waiting = await fill_queue(server, http, {**LONG, "stream": False})
            await check_refused(server, http)
            for task in waiting:  # their connections close while they wait in the queue
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            await ctx.__aexit__(None, None, None)
            del lines

    asyncio.run(main())
    assert wait_until(server.is_idle), server.engine.stats()
    resp = httpx.post(f"{server.url}{CHAT}", json=SHORT, timeout=60)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] is not None
