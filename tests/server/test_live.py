"""End to end through a real uvicorn on loopback and the official `openai` SDK (sync and async):
every chunk must parse, errors must map to the SDK's exception classes. Also what only a real
socket shows: client disconnects abort the engine request, and SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import httpx
import openai
import pytest

from server_support import live_server, make_cfg, parse_sse
from ember.server.app import create_app
from server_fakes import FakeEngine

MSGS = [{"role": "user", "content": "hi"}]
EVENT_TIMEOUT = 10  # seconds; a safety net for event waits, never a synchronization sleep


@pytest.fixture(scope="module")
def live_engine(tokenizer):
    return FakeEngine(tokenizer)


@pytest.fixture(scope="module")
def live(live_engine):
    with live_server(create_app(live_engine, make_cfg(api_key="test-key"))) as server:
        yield server
    assert live_engine.started and live_engine.shut_down  # lifespan ran the engine


@pytest.fixture
def engine(live_engine, tokenizer):
    """The live server's engine with its knobs reset after each test."""
    yield live_engine
    live_engine.release()
    fresh = FakeEngine(tokenizer)
    for knob in ("queue_full", "fail_after", "hang_after", "healthy", "calls", "aborted", "abort_event", "hanging", "closed_unfinished"):
        setattr(live_engine, knob, getattr(fresh, knob))


@pytest.fixture
def sdk(live):
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="test-key", max_retries=0) as client:
        yield client


def test_sdk_chat_and_completions(sdk, engine):
    resp = sdk.chat.completions.create(model="fake-model", messages=MSGS, max_tokens=50)
    assert resp.choices[0].message.content == engine.reply and resp.choices[0].finish_reason == "stop"
    comp = sdk.completions.create(model="fake-model", prompt=["a", "b"], max_tokens=3, n=2)
    assert [c.text for c in comp.choices] == ["Hel", "[1]", "Hel", "[1]"]
    assert [m.id for m in sdk.models.list()] == ["fake-model", "fake-lora"]


def test_sdk_streams(sdk, engine):
    chunks = list(sdk.chat.completions.create(
        model="fake-model", messages=MSGS, stream=True, n=2, logprobs=True, top_logprobs=1, stream_options={"include_usage": True}
    ))
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert texts == {0: engine.reply, 1: engine.reply_for(1)}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    comp = list(sdk.completions.create(model="fake-model", prompt="x", max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in comp) == "Hell" and comp[-1].choices[0].finish_reason == "length"


def test_sdk_errors(sdk, engine, live):
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.models.retrieve("gpt-9")
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.completions.create(model="fake-model", prompt="x" * 600)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.chat.completions.create(model="fake-model", messages=MSGS, n=99)
    assert exc.value.param == "n"
    engine.queue_full = True
    with pytest.raises(openai.RateLimitError) as exc:
        sdk.chat.completions.create(model="fake-model", messages=MSGS, stream=True)
    assert exc.value.response.headers["retry-after"] == "3"
    engine.queue_full = False
    engine.fail_after = 2
    with pytest.raises(openai.APIError) as exc:
        for _ in sdk.chat.completions.create(model="fake-model", messages=MSGS, stream=True):
            pass
    assert exc.value.body["type"] == "internal_error"
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as exc:
            bad.models.list()
    assert exc.value.code == "invalid_api_key"
    assert httpx.get(f"{live.url}/health").status_code == 200  # no key needed


def test_async_sdk(live, engine):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="test-key", max_retries=0) as client:
            streams = [await client.chat.completions.create(model="fake-model", messages=MSGS, stream=True) for _ in range(3)]

            async def drain(s):
                return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

            texts = await asyncio.gather(*(drain(s) for s in streams))
            resp = await client.completions.create(model="fake-lora", prompt="q", max_tokens=2)
            return texts, resp

    texts, resp = asyncio.run(main())
    assert texts == [engine.reply] * 3 and resp.choices[0].text == "He"
    assert engine.calls[-1].lora_name == "fake-lora"


def test_stream_disconnect_aborts(live, engine):
    engine.hang_after = 3
    with httpx.Client(base_url=live.url, headers={"Authorization": "Bearer test-key"}) as client:
        with client.stream("POST", "/v1/chat/completions", json={"model": "fake-model", "messages": MSGS, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: dropping the iterator would already close the connection
            next(line for line in lines if '"content": "H"' in line)
    # leaving the block closed the connection mid-stream (the fake hangs at its 4th token, so the
    # request cannot have finished on its own)
    assert engine.abort_event.wait(EVENT_TIMEOUT)
    assert engine.aborted == [engine.calls[-1].request_id]


@pytest.mark.parametrize("stream,hang_after", [(False, 2), (True, 0)])  # (True, 0): gone before the first token
def test_disconnect_before_response_aborts(live, engine, stream, hang_after):
    engine.hang_after = hang_after
    body = json.dumps({"model": "fake-model", "prompt": "x", "max_tokens": 100, "stream": stream}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer test-key\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(head + body)
        assert engine.hanging.wait(EVENT_TIMEOUT)
    assert engine.abort_event.wait(EVENT_TIMEOUT)
    assert engine.aborted == [engine.calls[-1].request_id]


def test_sigterm_drains_in_flight_requests(tokenizer):
    engine = FakeEngine(tokenizer)
    engine.hang_after = 2
    app = create_app(engine, make_cfg())
    with live_server(app) as server:
        with httpx.Client(base_url=server.url) as client:
            with client.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 5}) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert engine.hanging.wait(EVENT_TIMEOUT)
                server.server.handle_exit(signal.SIGTERM, None)
                assert app.state.ember.is_draining
                engine.release()  # the in-flight request may finish
                rest = "\n\n".join([first] + [line for line in lines if line.startswith("data: ")])
        server.thread.join(EVENT_TIMEOUT)
        assert not server.thread.is_alive()
    events = parse_sse(rest)
    assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hello"
    assert engine.aborted == [] and engine.shut_down
