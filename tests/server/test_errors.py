"""The reliability contract over ASGI: every bad input is a 4xx in OpenAI's error shape naming the
field, never a 500; auth, body size, queue full, draining, engine failures, deadlines."""

from __future__ import annotations

import pytest

from server_support import asgi_client, make_cfg, parse_sse
from ember.server.app import create_app

pytestmark = pytest.mark.anyio

MSGS = [{"role": "user", "content": "hi"}]
LIMITS = dict(max_tokens_limit=100, max_prompt_tokens=64, max_n=4, max_stop_sequences=3, max_stop_length=8, max_stop_token_ids=2, max_body_bytes=4096, max_prompts=3)


def assert_error(r, status: int, param=None, code=None, type_=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    if type_ is not None:
        assert err["type"] == type_, err
    return err


@pytest.fixture
def limited(engine):
    return asgi_client(create_app(engine, make_cfg(limits=LIMITS)))


CHAT_BAD = [
    ({"n": 5}, "n"),
    ({"n": 0}, "n"),
    ({"max_tokens": 101}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 101}, "max_completion_tokens"),
    ({"stop": ["a", "b", "c", "d"]}, "stop"),
    ({"stop": "x" * 9}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [1, 2, 3]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"seed": 2**70}, "seed"),
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": "x" * 80}]}, "messages"),
    ({"stream": "yes please"}, "stream"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"regex": "a+("}, "regex"),
    ({"grammar": "root ::= undefined_rule"}, "grammar"),
    ({"choice": []}, "choice"),
    ({"regex": "a+", "choice": ["a"]}, "regex"),
    ({"logit_bias": {"x": 5}}, "logit_bias"),
    ({"logit_bias": {"1.5": 5}}, "logit_bias"),
    ({"logit_bias": {"-1": 5}}, "logit_bias"),
    ({"logit_bias": {"1000000": 5}}, "logit_bias"),
    ({"logit_bias": {"1": 100.5}}, "logit_bias"),
    ({"logit_bias": {"1": -101}}, "logit_bias"),
]


@pytest.mark.parametrize("extra,param", CHAT_BAD)
async def test_chat_bounds(limited, engine, extra, param):
    r = await limited.post("/v1/chat/completions", json={"model": "fake-model", "messages": MSGS, **extra})
    assert_error(r, 400, param=param, type_="invalid_request_error")
    assert not engine.calls, "a refused request must never reach the engine"


COMPLETION_BAD = [
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, -1]}, "prompt"),
    ({"prompt": [1, 10**6]}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": ["a", "b", "c", "d"]}, "prompt"),
    ({"prompt": "x" * 65}, "prompt"),
    ({"logprobs": 21}, "logprobs"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "!"}, "suffix"),
    ({"logit_bias": {"x": 5}}, "logit_bias"),
    ({"logit_bias": {"1.5": 5}}, "logit_bias"),
    ({"logit_bias": {"-1": 5}}, "logit_bias"),
    ({"logit_bias": {"1000000": 5}}, "logit_bias"),
    ({"logit_bias": {"1": 100.5}}, "logit_bias"),
    ({"logit_bias": {"1": -101}}, "logit_bias"),
]


@pytest.mark.parametrize("body,param", COMPLETION_BAD)
async def test_completion_bounds(limited, engine, body, param):
    r = await limited.post("/v1/completions", json={"prompt": "hi", **body})
    assert_error(r, 400, param=param)
    assert not engine.calls


async def test_tools_with_tool_choice_none_are_accepted(client):
    body = {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none", "max_tokens": 2}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200


async def test_context_length_exceeded(client, engine):
    prompt = "x" * 500
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 100})
    err = assert_error(r, 400, param="max_tokens", code="context_length_exceeded")
    assert "512" in err["message"] and "600" in err["message"] and "500" in err["message"]
    r = await client.post("/v1/completions", json={"prompt": "x" * 600})
    err = assert_error(r, 400, param="prompt", code="context_length_exceeded")
    assert "512" in err["message"] and "600" in err["message"]
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 512}]})
    assert_error(r, 400, code="context_length_exceeded")
    assert not engine.calls


@pytest.mark.parametrize(
    "content,status,code",
    [(b"{bad json", 400, "invalid_json"), (b"", 400, "invalid_json"), (b"[1, 2]", 400, None), (b"\xff\xfe", 400, "invalid_json")],
)
async def test_malformed_bodies(client, content, status, code):
    r = await client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert_error(r, status, code=code)


async def test_routes_and_model(engine):
    async with asgi_client(create_app(engine, make_cfg(strict_model_name=True))) as client:
        assert_error(await client.get("/v1/nothing"), 404, code="not_found")
        assert_error(await client.get("/v1/chat/completions"), 405)
        r = await client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MSGS})
        assert_error(r, 404, param="model", code="model_not_found")
        r = await client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
        assert_error(r, 404, code="model_not_found")
        r = await client.post("/tokenize", json={"model": "gpt-9", "prompt": "x"})
        assert_error(r, 404, code="model_not_found")


async def test_api_key(engine):
    async with asgi_client(create_app(engine, make_cfg(api_key="sekret"))) as c:
        assert_error(await c.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(await c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
        assert_error(await c.get("/metrics"), 401, code="invalid_api_key")
        assert_error(await c.get("/v1/nothing"), 401, code="invalid_api_key")
        assert (await c.get("/health")).status_code == 200
        ok = {"Authorization": "Bearer sekret"}
        assert (await c.get("/v1/models", headers=ok)).status_code == 200
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=ok)
        assert r.status_code == 200


async def test_body_too_large(limited, engine):
    r = await limited.post("/v1/completions", json={"prompt": "x" * 5000})
    assert_error(r, 413, code="request_too_large")

    async def chunked():  # no Content-Length: the bytes are counted
        for _ in range(10):
            yield b" " * 1000

    r = await limited.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_error(r, 413, code="request_too_large")
    assert not engine.calls


@pytest.mark.parametrize("stream", [False, True])
async def test_queue_full_429_before_stream(client, engine, stream):
    engine.queue_full = True
    r = await client.post("/v1/chat/completions", json={"messages": MSGS, "stream": stream})
    assert_error(r, 429, code="queue_full", type_="rate_limit_error")
    assert r.headers["retry-after"] == "3"
    assert r.headers["content-type"].startswith("application/json")


async def test_draining(client, engine):
    app_state = client._transport.app.state.ember
    app_state.is_draining = True
    assert_error(await client.post("/v1/completions", json={"prompt": "x"}), 503, code="server_draining")
    assert_error(await client.get("/health"), 503, code="server_draining")
    assert (await client.get("/metrics")).status_code == 200
    assert not engine.calls


async def test_unexpected_error_is_opaque_500(client, engine):
    engine.fail_after = 0
    r = await client.post("/v1/completions", json={"prompt": "x"})
    err = assert_error(r, 500, type_="internal_error")
    assert "secret" not in r.text and "boom" not in r.text
    assert err["message"] == "The server had an error while processing your request."


async def test_error_mid_stream_is_an_sse_event(client, engine):
    engine.fail_after = 3
    r = await client.post("/v1/chat/completions", json={"messages": MSGS, "stream": True})
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "internal_error" and "secret" not in r.text
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "Hel"


async def test_request_timeout(client, engine):
    engine.hang_after = 1
    r = await client.post("/v1/completions", json={"prompt": "x"}, headers={"Request-Timeout-Ms": "30"})
    assert_error(r, 408, code="request_timeout", type_="timeout_error")
    assert engine.calls[-1].deadline is not None and engine.aborted == [engine.calls[-1].request_id]
    r = await client.post("/v1/completions", json={"prompt": "x", "stream": True}, headers={"X-Request-Timeout": "0.03"})
    events = parse_sse(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout"
    assert events[0]["choices"][0]["text"] == "H"
    assert engine.aborted[-1] == engine.calls[-1].request_id
    for bad in ("abc", "-5", "0", "nan", "1e30"):
        r = await client.post("/v1/completions", json={"prompt": "x"}, headers={"Request-Timeout-Ms": bad})
        assert_error(r, 400, param="request-timeout-ms")


async def test_bad_request_does_not_harm_others(client, engine):
    import asyncio

    good = {"messages": MSGS, "max_tokens": 5}
    results = await asyncio.gather(
        client.post("/v1/chat/completions", json=good),
        client.post("/v1/chat/completions", content=b"{"),
        client.post("/v1/chat/completions", json={**good, "n": 10**9}),
        client.post("/v1/chat/completions", json=good),
    )
    assert [r.status_code for r in results] == [200, 400, 400, 200]
    assert results[0].json()["choices"][0]["message"]["content"] == "Hello"
