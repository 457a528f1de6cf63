"""SSE streams over ASGI, chunk by chunk, each validated with the official SDK's chunk types:
role delta first, content deltas, an empty delta with finish_reason, include_usage, n > 1,
logprobs, echo, and the held-back partial UTF-8 character."""

from __future__ import annotations

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from server_support import parse_sse

pytestmark = pytest.mark.anyio

MSGS = [{"role": "user", "content": "hi"}]


async def stream(client, path, body):
    r = await client.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


async def test_chat_stream_shape(client, engine):
    events = await stream(client, "/v1/chat/completions", {"messages": MSGS})
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    assert all("usage" not in e for e in events)  # without include_usage the key is absent, as OpenAI does
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    middle = chunks[1:-1]
    assert all(c.choices[0].delta.role is None and c.choices[0].finish_reason is None for c in middle)
    assert "".join(c.choices[0].delta.content for c in middle) == engine.reply
    # "é" is two byte tokens: no chunk ever carries half of it
    assert all("\ufffd" not in c.choices[0].delta.content for c in middle)
    assert events[-1]["choices"][0]["delta"] == {} and chunks[-1].choices[0].finish_reason == "stop"


async def test_chat_stream_usage_n_and_logprobs(client, engine):
    body = {"messages": MSGS, "n": 2, "max_tokens": 4, "logprobs": True, "top_logprobs": 3, "stream_options": {"include_usage": True}}
    events = await stream(client, "/v1/chat/completions", body)
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    assert all("usage" in e for e in events) and all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8 and last.usage.total_tokens == last.usage.prompt_tokens + 8
    texts, finishes, tokens = {0: "", 1: ""}, {}, {0: [], 1: []}
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
        if choice.logprobs:
            tokens[choice.index] += [t.token for t in choice.logprobs.content]
            assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    assert texts == {0: "Hell", 1: "[1] "} and finishes == {0: "length", 1: "length"}
    assert tokens == {0: list("Hell"), 1: list("[1] ")}
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]


async def test_completion_stream(client, engine):
    body = {"prompt": ["ab", "cd"], "n": 2, "max_tokens": 3, "echo": True, "logprobs": 1, "stream_options": {"include_usage": True}}
    events = await stream(client, "/v1/completions", body)
    texts, offsets = {}, {}
    for e in events[:-1]:
        assert e["object"] == "text_completion" and e["usage"] is None
        (choice,) = e["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["logprobs"]:
            offsets.setdefault(choice["index"], []).extend(choice["logprobs"]["text_offset"])
    assert texts == {0: "abHel", 1: "ab[1]", 2: "cdHel", 3: "cd[1]"}
    assert offsets[0] == [0, 1, 2, 3, 4]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12
    finals = [e["choices"][0] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1, 2, 3] and all(c["text"] == "" for c in finals)
    plain = await stream(client, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    for e in plain:  # the SDK's strict type wants a finish_reason; OpenAI itself streams null ones
        assert set(e) == {"id", "object", "created", "model", "choices", "system_fingerprint"}
        assert set(e["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    Completion.model_validate(plain[-1])
    assert "".join(e["choices"][0]["text"] for e in plain) == "He"


async def test_stream_stop_string(client):
    events = await stream(client, "/v1/chat/completions", {"messages": MSGS, "stop": "I am", "include_stop_str_in_output": True})
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == "Hello! I am" and events[-1]["choices"][0]["finish_reason"] == "stop"
