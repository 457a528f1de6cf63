"""The HTTP API's happy paths over ASGI: chat and completions (every prompt form, echo, stop, n,
logprobs), models, tokenize/detokenize, chat templates, defaults, metrics. Responses are checked
against the official SDK's own types."""

from __future__ import annotations

import logging

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from server_support import asgi_client, make_cfg
from ember.server.app import create_app

pytestmark = pytest.mark.anyio

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


async def test_chat_completion(client, engine):
    r = await client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MSGS, "temperature": 0})
    assert r.status_code == 200, r.text
    resp = ChatCompletion.model_validate(r.json())
    assert resp.choices[0].message.content == engine.reply
    assert resp.choices[0].finish_reason == "stop"
    assert resp.id.startswith("chatcmpl-") and r.headers["x-request-id"] == resp.id
    call = engine.calls[-1]
    prompt_text = engine.tokenizer.decode(call.prompt)
    assert prompt_text == "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert call.params.temperature == 0.0 and call.lora_name is None
    u = resp.usage
    assert (u.prompt_tokens, u.completion_tokens) == (len(call.prompt), len(engine.tokenizer.encode(engine.reply)))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.prompt_tokens_details.cached_tokens == 3


async def test_chat_content_parts_roles_and_n(client, engine):
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Rule one."}, {"type": "text", "text": "Rule two."}]},
        {"role": "user", "content": "Call it"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "n": 3, "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    resp = ChatCompletion.model_validate(r.json())
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.message.content for c in resp.choices] == ["Hell", "[1] ", "[2] "]
    assert all(c.finish_reason == "length" for c in resp.choices)
    lp = resp.choices[0].logprobs.content
    assert [t.token for t in lp] == ["H", "e", "l", "l"] and len(lp[0].top_logprobs) == 2 and lp[0].bytes == [72]
    text = engine.tokenizer.decode(engine.calls[-1].prompt)
    assert "<|im_start|>system\nRule one.\nRule two.<|im_end|>" in text and "<|im_start|>tool\n42<|im_end|>" in text


async def test_lora_model_stop_and_sampling_fields(client, engine):
    body = {"model": "fake-lora", "messages": MSGS, "stop": ["fake"], "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "seed": 7,
            "ignore_eos": False, "stop_token_ids": [3], "min_tokens": 1, "presence_penalty": 0.5, "some_future_field": 1}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "fake-lora" and r.json()["choices"][0]["message"]["content"] == "Hello! I am a "
    p = engine.calls[-1].params
    assert engine.calls[-1].lora_name == "fake-lora"
    assert (p.top_k, p.min_p, p.repetition_penalty, p.seed, p.stop, p.stop_token_ids, p.min_tokens, p.presence_penalty) == (
        5, 0.1, 1.2, 7, ["fake"], [3], 1, 0.5)


@pytest.mark.parametrize("form", ["str", "list[str]", "list[int]", "list[list[int]]"])
async def test_completion_prompt_forms(client, engine, form):
    enc = engine.tokenizer.encode
    prompt, expected = {
        "str": ("ab", [enc("ab")]),
        "list[str]": (["ab", "c"], [enc("ab"), enc("c")]),
        "list[int]": ([10, 20], [[10, 20]]),
        "list[list[int]]": ([[10], [20, 30]], [[10], [20, 30]]),
    }[form]
    r = await client.post("/v1/completions", json={"model": "fake-model", "prompt": prompt, "max_tokens": 3, "n": 2})
    assert r.status_code == 200, r.text
    resp = Completion.model_validate(r.json())
    assert [c.index for c in resp.choices] == list(range(2 * len(expected)))
    assert [c.text for c in resp.choices] == ["Hel", "[1]"] * len(expected)
    assert [c.prompt for c in engine.calls] == expected
    assert resp.usage.prompt_tokens == sum(len(p) for p in expected)
    assert len({c.request_id for c in engine.calls}) == len(expected)


async def test_completion_echo_and_logprobs(client, engine):
    r = await client.post("/v1/completions", json={"prompt": "Say:", "echo": True, "logprobs": 2, "max_tokens": 2})
    c = r.json()["choices"][0]  # echoed prompt tokens have null logprobs (as OpenAI's first token): not the SDK's strict type
    assert c["text"] == "Say:He"
    lp = c["logprobs"]
    assert lp["tokens"] == ["S", "a", "y", ":", "H", "e"]
    assert lp["token_logprobs"] == [None] * 4 + [-0.25, -0.25]
    assert lp["text_offset"] == [0, 1, 2, 3, 4, 5] and lp["top_logprobs"][4] == {"H": -0.25, "I": -2.0}
    r = await client.post("/v1/completions", json={"prompt": engine.tokenizer.encode("Sa"), "echo": True, "max_tokens": 1})
    assert r.json()["choices"][0]["text"] == "SaH"


async def test_default_max_tokens(engine):
    async with asgi_client(create_app(engine, make_cfg(request_default_max_tokens=7))) as c:
        await c.post("/v1/completions", json={"prompt": "abc"})
    assert engine.calls[-1].params.max_tokens == 7
    async with asgi_client(create_app(engine, make_cfg(request_default_max_tokens=700))) as c:
        await c.post("/v1/chat/completions", json={"messages": MSGS})
        assert engine.calls[-1].params.max_tokens == engine.max_model_len - len(engine.calls[-1].prompt)  # never past the context
    async with asgi_client(create_app(engine, make_cfg())) as c:
        r = await c.post("/v1/completions", json={"prompt": "abc"})
        assert engine.calls[-1].params.max_tokens == 16  # OpenAI's completions default
        await c.post("/v1/chat/completions", json={"messages": MSGS})
        assert engine.calls[-1].params.max_tokens == engine.max_model_len - len(engine.calls[-1].prompt)  # chat: the rest of the context


NULLABLE_CHAT = ["n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty",
                 "seed", "stop", "stream", "stream_options", "logit_bias", "user", "response_format", "logprobs", "top_logprobs",
                 "tools", "tool_choice", "parallel_tool_calls", "model"]
NULLABLE_COMPLETION = ["prompt", "echo", "logprobs", "best_of", "suffix", "n", "max_tokens", "temperature", "top_p",
                       "presence_penalty", "frequency_penalty", "seed", "stop", "stream", "stream_options", "logit_bias", "user"]


async def test_null_means_absent(client, engine):
    """Every field OpenAI marks nullable accepts an explicit null, and it means the default."""
    r = await client.post("/v1/chat/completions", json={"messages": MSGS, **{k: None for k in NULLABLE_CHAT}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == engine.reply
    r = await client.post("/v1/completions", json={**{k: None for k in NULLABLE_COMPLETION}})
    assert r.status_code == 200, r.text
    call = engine.calls[-1]
    assert call.prompt == [engine.tokenizer.bos_token_id] and call.params.max_tokens == 16 and call.params.n == 1


async def test_any_model_name_serves_the_base_model(client, engine):
    """Baseten's rule: `model` may be any string; an adapter's name selects the adapter; responses name what served."""
    for name in ("not-required", "model", "gpt-4o"):
        r = await client.post("/v1/chat/completions", json={"model": name, "messages": MSGS, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "fake-model"
        assert engine.calls[-1].lora_name is None
    r = await client.post("/v1/completions", json={"model": "fake-lora", "prompt": "x", "max_tokens": 2})
    assert r.json()["model"] == "fake-lora" and engine.calls[-1].lora_name == "fake-lora"


async def test_top_p_zero_is_greedy(client, engine):
    r = await client.post("/v1/completions", json={"prompt": "x", "top_p": 0, "temperature": 0.8, "max_tokens": 2})
    assert r.status_code == 200 and engine.calls[-1].params.is_greedy


def test_settings_from_the_real_config():
    from ember.config import load_config
    from ember.server.limits import ServerSettings

    cfg = load_config({
        "model_name": "x",
        "trt_llm": {"runtime": {"request_default_max_tokens": 9}},
        "ember": {"api_key": "k", "drain_timeout_s": 5, "trust_request_chat_template": True, "limits": {"max_n": 3, "max_body_bytes": 1000}},
    })
    s = ServerSettings.from_config(cfg)
    assert (s.api_key, s.drain_timeout_s, s.trust_request_chat_template, s.max_n, s.max_body_bytes, s.default_max_tokens) == ("k", 5.0, True, 3, 1000, 9)
    assert (s.host, s.port, s.max_logprobs, s.max_stop_sequences) == ("127.0.0.1", 8000, 20, 16)


async def test_models(client):
    r = await client.get("/v1/models")
    data = r.json()["data"]
    assert [m["id"] for m in data] == ["fake-model", "fake-lora"] and data[1]["parent"] == "fake-model"
    assert (await client.get("/v1/models/fake-lora")).json()["id"] == "fake-lora"
    r = await client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_tokenize_detokenize(client, engine):
    r = await client.post("/tokenize", json={"prompt": "héllo"})
    body = r.json()
    assert body["count"] == 6 and body["max_model_len"] == engine.max_model_len
    r = await client.post("/detokenize", json={"tokens": body["tokens"]})
    assert r.json() == {"prompt": "héllo"}
    r = await client.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]})
    assert engine.tokenizer.decode(r.json()["tokens"]) == "<s><|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    for bad in ({}, {"prompt": "a", "messages": [{"role": "user", "content": "x"}]}):
        r = await client.post("/tokenize", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = await client.post("/detokenize", json={"tokens": [1, 10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


async def test_fallback_template_is_logged_and_used(tokenizer, caplog):
    from server_fakes import FakeEngine

    engine = FakeEngine(tokenizer, chat_template=None)
    with caplog.at_level(logging.WARNING, logger="ember.server"):
        app = create_app(engine, make_cfg())
    assert any("no chat template" in r.message for r in caplog.records)
    async with asgi_client(app) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    assert tokenizer.decode(engine.calls[-1].prompt) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


async def test_request_chat_template_needs_trust(engine):
    body = {"messages": [{"role": "user", "content": "x"}], "chat_template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"}
    async with asgi_client(create_app(engine, make_cfg())) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
    async with asgi_client(create_app(engine, make_cfg(trust_request_chat_template=True))) as c:
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and engine.tokenizer.decode(engine.calls[-1].prompt) == "[x]"
        for evil in ("{{ messages.append(1) }}", "{{ raise_exception('no system role') }}", "{{ 1/0 }}", "{% if %}"):
            r = await c.post("/v1/chat/completions", json={**body, "chat_template": evil})
            assert r.status_code == 400, (evil, r.text)
            assert r.json()["error"]["param"] in ("messages", "chat_template")
        helpers = "{{ strftime_now('%Y') | length }}{{ {'a': 'é'} | tojson }}{{ eos_token }}"
        r = await c.post("/v1/chat/completions", json={**body, "chat_template": helpers})
        assert r.status_code == 200 and engine.tokenizer.decode(engine.calls[-1].prompt) == '4{"a": "é"}</s>'


async def test_metrics_series(client):
    await client.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 3})
    await client.post("/v1/chat/completions", json={"messages": MSGS, "n": 99})
    text = (await client.get("/metrics")).text
    for series in (
        "ember_num_requests_running 1.0", "ember_num_requests_waiting 2.0", "ember_kv_cache_usage_perc 0.25",
        "ember_prefix_cache_hit_rate 0.4", "ember_prompt_tokens_total 1234.0", "ember_generation_tokens_total 567.0",
        "ember_spec_decode_acceptance_rate 0.7", "ember_time_to_first_token_seconds_count 1.0",
        "ember_inter_token_latency_seconds_count 2.0", "ember_e2e_request_latency_seconds_count 1.0",
        'ember_request_success_total{finished_reason="length"} 1.0', 'ember_request_errors_total{status="400"} 1.0',
        "ember_engine_healthy 1.0",
    ):
        assert series in text, series


async def test_health(client, engine):
    r = await client.get("/health")
    assert r.status_code == 200
    engine.healthy = False
    r = await client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    r = await client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
