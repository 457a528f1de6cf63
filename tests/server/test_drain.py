"""The end of a SIGTERM drain through a real uvicorn on loopback: requests still running when
ember.drain_timeout_s ends get an error in OpenAI's shape (a stream: an SSE error event then `[DONE]`; the
Responses API: its `error` event; a plain request: a 503 JSON body) instead of a cut connection, their
engine requests are aborted, and new requests during the drain get 503 while the server still listens."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from starlette.responses import StreamingResponse

from server_support import live_server, make_cfg, parse_sse
from ember.server.app import create_app
from server_fakes import FakeEngine

EVENT_TIMEOUT = 10  # seconds; a safety net for event waits, never a synchronization sleep
DRAIN_S = 2.0  # long enough for the one request the test sends during the drain


def _responses_events(text: str) -> list[tuple[str, dict]]:
    """A Responses API SSE body -> [(event name, data)]."""
    events = []
    for block in filter(None, (b.strip() for b in text.split("\n\n"))):
        name, data = block.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: "), block
        events.append((name[len("event: "):], json.loads(data[len("data: "):])))
    return events


def _assert_shutdown_error(error: dict) -> None:
    assert error["type"] == "service_unavailable" and error["code"] == "server_shutdown" and error["param"] is None
    assert "drain time of 2 s (ember.drain_timeout_s)" in error["message"]


def test_requests_left_at_the_end_of_the_drain_get_an_error(tokenizer):
    engine = FakeEngine(tokenizer)
    engine.hang_after = 2  # every request hangs after two outputs: none can finish during the drain
    app = create_app(engine, make_cfg(drain_timeout_s=DRAIN_S))
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 50}
    with live_server(app) as server, ThreadPoolExecutor(1) as pool:
        plain = pool.submit(httpx.post, f"{server.url}/v1/completions", json=body, timeout=EVENT_TIMEOUT)
        assert engine.hanging.wait(EVENT_TIMEOUT)  # the non-streaming request is in flight
        with (openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0) as sdk,
              httpx.Client(base_url=server.url, timeout=EVENT_TIMEOUT) as client):
            chat = iter(sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True))
            assert next(chat).choices[0].delta.role == "assistant"
            with (client.stream("POST", "/v1/completions", json={**body, "prompt": ["x", "y"], "stream": True}) as comp,  # 2 prompts
                  client.stream("POST", "/v1/responses", json={"model": "fake-model", "input": "hi", "stream": True}) as resp):
                assert comp.status_code == resp.status_code == 200  # both started: the engine accepted them
                server.server.handle_exit(signal.SIGTERM, None)
                new = client.post("/v1/completions", json=body)  # still listening: refused in OpenAI's shape
                assert new.status_code == 503 and new.json()["error"]["code"] == "server_draining"
                comp_events = parse_sse(comp.read().decode())
                resp_events = _responses_events(resp.read().decode())
            with pytest.raises(openai.APIError) as exc:
                list(chat)
        server.thread.join(EVENT_TIMEOUT)
        assert not server.thread.is_alive()
        r = plain.result()
    assert r.status_code == 503
    _assert_shutdown_error(r.json()["error"])
    _assert_shutdown_error(exc.value.body)
    assert comp_events[-1] == "[DONE]" and all("choices" in e for e in comp_events[:-2])
    _assert_shutdown_error(comp_events[-2]["error"])
    assert [name for name, _ in resp_events][:2] == ["response.created", "response.in_progress"]
    assert resp_events[-1][0] == "error"
    _assert_shutdown_error(resp_events[-1][1]["error"])
    assert len(engine.calls) == 5 and sorted(engine.aborted) == sorted(c.request_id for c in engine.calls)
    assert engine.shut_down


@pytest.mark.parametrize("is_streamed", [False, True])
def test_what_uvicorn_cancels_at_the_very_end_is_logged_without_a_traceback(tokenizer, caplog, is_streamed):
    """A request outside the engine (or a stream whose client stopped reading) is past the drain's reach: uvicorn
    cancels it; it gets a 503 if nothing was sent yet, else its connection is closed; one log line either way."""
    app = create_app(FakeEngine(tokenizer), make_cfg(drain_timeout_s=0.1))
    entered = threading.Event()

    async def forever():
        entered.set()
        await asyncio.Event().wait()
        yield b""

    @app.get("/v1/hang")
    async def hang():
        if is_streamed:
            return StreamingResponse(forever(), media_type="text/event-stream")
        await anext(forever())

    uvicorn_log = logging.getLogger("uvicorn.error")  # does not propagate to the root; set up by build_server
    try:
        with live_server(app) as server, ThreadPoolExecutor(1) as pool:
            uvicorn_log.addHandler(caplog.handler)
            server.server.config.timeout_graceful_shutdown = 0.1  # uvicorn cancels it 0.1 s after the drain time
            pending = pool.submit(httpx.get, f"{server.url}/v1/hang", timeout=EVENT_TIMEOUT)
            assert entered.wait(EVENT_TIMEOUT)
            server.server.handle_exit(signal.SIGTERM, None)
            if is_streamed:
                with pytest.raises(httpx.RemoteProtocolError):  # the headers went out: only closing is left
                    pending.result()
            else:
                r = pending.result()
                assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutdown"
            server.thread.join(EVENT_TIMEOUT)
            assert not server.thread.is_alive()
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert "GET /v1/hang was still running at the end of the shutdown" in caplog.text
    assert "Traceback" not in caplog.text and "Exception in ASGI application" not in caplog.text
