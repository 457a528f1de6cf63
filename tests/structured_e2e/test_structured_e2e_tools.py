"""Function calling through the real server and the openai client: tool_choice required / named
always yield calls whose arguments validate against the tool's schema; auto yields text or valid
calls; streamed calls reassemble into the non-streamed ones (greedy); assistant tool_calls and
`tool` results round-trip through the prompt."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

MODEL = "SmolLM2-135M-Instruct"

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                        "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
       "required": ["a", "b"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 30},
                                           "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
          "required": ["query"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "add": ADD, "web_search": SEARCH}
TOOLS = [{"type": "function", "function": {"name": n, "description": d, "parameters": SCHEMAS[n]}}
         for n, d in (("get_weather", "Current weather in a city"), ("add", "Add two integers"),
                      ("web_search", "Search the web"))]
PROMPTS = ["What's the weather in Paris?", "What is 12 plus 30?", "Find recent news about the Mars rover.",
           "Is it raining in Tokyo, and what is 2 plus 2?"]

pytestmark = pytest.mark.anyio


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def check_calls(choice, allowed: set[str], max_calls: int | None = None) -> list[tuple[str, dict]]:
    calls = choice.message.tool_calls
    assert calls, f"no tool call: {choice.message.content!r}"
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert max_calls is None or len(calls) <= max_calls
    out = []
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in allowed
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, SCHEMAS[c.function.name])
        out.append((c.function.name, args))
    return out


async def test_required_and_named_calls_validate(aclient):
    kw = {"model": MODEL, "tools": TOOLS, "temperature": 0.7, "max_tokens": 300}
    jobs = [(p, "required", seed, seed % 2 == 0) for seed, p in enumerate(PROMPTS)]
    jobs += [(p, {"type": "function", "function": {"name": name}}, 10 + i, True)
             for i, (p, name) in enumerate(zip(PROMPTS, ["get_weather", "add", "web_search"]))]
    resps = await asyncio.gather(*(aclient.chat.completions.create(
        messages=ask(p), tool_choice=choice, seed=seed, parallel_tool_calls=parallel, **kw)
        for p, choice, seed, parallel in jobs))
    for (p, choice, _, parallel), r in zip(jobs, resps):
        if choice == "required":
            check_calls(r.choices[0], set(SCHEMAS), None if parallel else 1)
        else:
            name = choice["function"]["name"]
            assert [n for n, _ in check_calls(r.choices[0], {name}, 1)] == [name]


async def test_auto_returns_text_or_valid_calls(aclient):
    resps = await asyncio.gather(*(aclient.chat.completions.create(
        model=MODEL, messages=ask(p), tools=TOOLS, tool_choice="auto", temperature=0.7, seed=i, max_tokens=80)
        for i, p in enumerate(PROMPTS[:2] + ["Tell me a joke."])))
    for r in resps:
        choice = r.choices[0]
        if choice.message.tool_calls:
            check_calls(choice, set(SCHEMAS))
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content is not None


def reassemble(chunks) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """Stream chunks -> ([(name, arguments)], content, finish_reason), as an SDK user adds them up."""
    calls: dict[int, dict] = {}
    content, finish = None, None
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        if d.content:
            content = (content or "") + d.content
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                assert entry["id"] is None, "a call's id comes once, first"
                entry["id"] = tc.id
            if tc.function and tc.function.name:
                entry["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                entry["arguments"] += tc.function.arguments
        finish = c.choices[0].finish_reason or finish
    assert all(e["id"] for e in calls.values())
    return [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)], content, finish


async def test_streamed_calls_match_whole_ones(aclient):
    cases = [("required", PROMPTS[0]), ({"type": "function", "function": {"name": "web_search"}}, PROMPTS[2])]
    kw = {"model": MODEL, "tools": TOOLS, "temperature": 0.0, "max_tokens": 200, "parallel_tool_calls": False}

    async def streamed(choice, p):
        return [c async for c in await aclient.chat.completions.create(messages=ask(p), tool_choice=choice, stream=True, **kw)]

    wholes = await asyncio.gather(*(aclient.chat.completions.create(messages=ask(p), tool_choice=c, **kw) for c, p in cases))
    streams = await asyncio.gather(*(streamed(c, p) for c, p in cases))
    for whole, chunks in zip(wholes, streams):
        calls, content, finish = reassemble(chunks)
        expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
        assert calls == expected and content is None and finish == "tool_calls" == whole.choices[0].finish_reason


def test_tool_results_round_trip(client, server_state):
    """An assistant turn with tool_calls and the `tool` result render through the built-in format
    (SmolLM2's template knows no tools) and the model can answer from them."""
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0.0, max_tokens=40)
    assert r.choices[0].message.content or r.choices[0].message.tool_calls
    from ember.server.protocol import ChatMessage

    text = server_state.renderer.render([ChatMessage.model_validate(m) for m in messages], tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temperature": 21, "sky": "sunny"}\n</tool_response>' in text
    assert '"name": "web_search"' in text and text.endswith("<|im_start|>assistant\n")
