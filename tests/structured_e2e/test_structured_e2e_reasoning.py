"""Reasoning models, with a scripted engine (the default model does not think): the `<think>` text
comes back as `reasoning_content` (message and stream deltas), the rest as content or tool calls,
and the grammar constraint is told to start after `</think>` (spec.reasoning)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))
from server_fakes import CHAT_TEMPLATE, FakeEngine, make_tokenizer  # noqa: E402

from ember.server.app import create_app  # noqa: E402

# DeepSeek-R1 style: the prompt opens <think>; Qwen3 style: the model opens it, unless enable_thinking=False
OPENS_THINK = CHAT_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
QWEN3_LIKE = CHAT_TEMPLATE.replace(
    "{{ '<|im_start|>assistant\n' }}",
    "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}")
MSGS = [{"role": "user", "content": "What is 2 + 2? Answer as JSON."}]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def serve(start_server, tokenizer, template: str, reply: str):
    assert template != CHAT_TEMPLATE
    engine = FakeEngine(tokenizer, chat_template=template, max_model_len=4096)
    engine.reply = reply
    server = start_server(create_app(engine))
    return engine, openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def stream_parts(client, **kw) -> tuple[str, str, str | None]:
    reasoning, content, finish = "", "", None
    for c in client.chat.completions.create(model="fake-model", messages=MSGS, stream=True, **kw):
        d = c.choices[0].delta
        reasoning += getattr(d, "reasoning_content", None) or ""
        content += d.content or ""
        finish = c.choices[0].finish_reason or finish
    return reasoning, content, finish


def test_prompt_opened_think(start_server, tokenizer):
    engine, client = serve(start_server, tokenizer, OPENS_THINK, "Two plus two is four.\n</think>\n\n{\"answer\": 4}")
    r = client.chat.completions.create(model="fake-model", messages=MSGS, response_format={"type": "json_object"})
    msg = r.choices[0].message
    assert msg.reasoning_content == "Two plus two is four." and json.loads(msg.content) == {"answer": 4}
    assert engine.calls[-1].params.structured.reasoning  # the constraint starts after </think>
    assert stream_parts(client, response_format={"type": "json_object"}) == (
        "Two plus two is four.", '{"answer": 4}', "stop")


def test_model_opened_think_and_tool_call(start_server, tokenizer):
    reply = '<think>I should add.</think>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call>'
    engine, client = serve(start_server, tokenizer, QWEN3_LIKE, reply)
    r = client.chat.completions.create(model="fake-model", messages=MSGS, tools=TOOLS)
    choice = r.choices[0]
    assert choice.message.reasoning_content == "I should add." and choice.message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [("add", {"a": 2, "b": 2})]
    assert choice.finish_reason == "tool_calls"
    r = client.chat.completions.create(model="fake-model", messages=MSGS, tools=TOOLS, tool_choice="required")
    assert engine.calls[-1].params.structured.reasoning and r.choices[0].message.tool_calls
    # thinking switched off by the template: no reasoning split, no reasoning constraint
    r = client.chat.completions.create(model="fake-model", messages=MSGS, response_format={"type": "json_object"},
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert not engine.calls[-1].params.structured.reasoning and r.choices[0].message.reasoning_content is None


def test_plain_model_output_is_untouched(start_server, tokenizer):
    """A template with no think tags: '<think>' in the output is content like any other text."""
    engine, client = serve(start_server, tokenizer, CHAT_TEMPLATE + " ", "<think>not reasoning</think> hi")
    r = client.chat.completions.create(model="fake-model", messages=MSGS)
    assert r.choices[0].message.content == "<think>not reasoning</think> hi"
    assert r.choices[0].message.reasoning_content is None
