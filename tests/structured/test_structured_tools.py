"""Function calling: tool prompts, tool_choice grammars (outputs parse and validate), the tool-call
parsers (whole and streamed, tags split across deltas) and reasoning parsing."""

import json

import jsonschema
import pytest

from ember.errors import InvalidRequestError
from ember.structured.tools import (ReasoningStreamParser, ToolCallStreamParser, add_tools_to_messages,
                                    inline_tool_messages,
                                    parse_reasoning, parse_tool_calls, render_tools_system_prompt,
                                    template_supports_tools, tool_call_spec)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["c", "f"]}}, "required": ["city"],
           "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
       "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"query": {"type": "string"}, "filters": {"type": "array", "maxItems": 2,
          "items": {"type": "object", "properties": {"k": {"type": "string"}, "v": {"type": "number"}},
                    "required": ["k", "v"], "additionalProperties": False}}}, "required": ["query"]}
TOOLS = [{"type": "function", "function": {"name": n, "description": f"{n} tool", "parameters": p}}
         for n, p in (("get_weather", WEATHER), ("add", ADD), ("search", SEARCH))]
SCHEMAS = {"get_weather": WEATHER, "add": ADD, "search": SEARCH}


def calls_of(text):
    content, calls = parse_tool_calls(text, tool_names=SCHEMAS)
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
    return content, calls


@pytest.mark.parametrize("choice,parallel", [("required", True), ("required", False),
                                             ({"type": "function", "function": {"name": "search"}}, True)])
def test_forced_tool_calls_parse_and_validate(choice, parallel, backend, walker):
    spec = tool_call_spec(TOOLS, choice, parallel)
    names, counts = set(), set()
    for seed in range(6):
        text, _ = walker.run(backend.new_matcher(spec), seed=seed, budget=40)
        content, calls = calls_of(text)
        assert content is None and calls, text
        names |= {c.name for c in calls}
        counts.add(len(calls))
    if isinstance(choice, dict):
        assert names == {"search"} and counts == {1}
    elif not parallel:
        assert counts == {1}


def test_tool_choice_none_auto_and_errors():
    assert tool_call_spec(TOOLS, "auto", True) is None
    assert tool_call_spec(TOOLS, None, True) is None
    assert tool_call_spec(TOOLS, "none", True) is None
    for choice, word in (("sometimes", "sometimes"), ({"type": "function", "function": {"name": "nope"}}, "nope"),
                         ({"type": "function"}, "name")):
        with pytest.raises(InvalidRequestError) as e:
            tool_call_spec(TOOLS, choice, True)
        assert e.value.param == "tool_choice" and word in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        tool_call_spec([], "required", True)
    assert e.value.param == "tool_choice"
    with pytest.raises(InvalidRequestError) as e:
        tool_call_spec([TOOLS[0], TOOLS[0]], "required", True)
    assert e.value.param == "tools" and "twice" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        tool_call_spec([{"type": "function", "function": {"name": "x", "parameters": {"type": "strnig"}}}], "auto")
    assert e.value.param == "tools"


def test_tools_prompt_and_template_detection():
    prompt = render_tools_system_prompt(TOOLS)
    assert "<tool_call>" in prompt and '"name": "get_weather"' in prompt and '"maxLength": 20' in prompt
    msgs = add_tools_to_messages([{"role": "user", "content": "hi"}], TOOLS)
    assert msgs[0]["role"] == "system" and msgs[1]["content"] == "hi"
    msgs = add_tools_to_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], TOOLS)
    assert msgs[0]["content"].startswith("Be brief.") and "<tools>" in msgs[0]["content"] and len(msgs) == 2
    qwen_like = "{%- if tools %}{{- '# Tools' }}{%- for tool in tools %}{{ tool | tojson }}{% endfor %}{% endif %}"
    assert template_supports_tools(qwen_like)
    smol = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']}}{% endfor %}"
    assert not template_supports_tools(smol) and not template_supports_tools(None)
    assert not template_supports_tools("{{ 'use the tools wisely' }}")


def test_parse_tool_calls_whole_text():
    text = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    content, calls = calls_of(text)
    assert content == "I will check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                   ("add", {"a": 1, "b": 2})]
    assert calls[0].id != calls[1].id and calls[0].to_openai()["type"] == "function"
    assert parse_tool_calls("just text") == ("just text", [])
    bad = '<tool_call>{"name": "get_weather", "arguments": {broken</tool_call>'
    assert parse_tool_calls(bad) == (None, [])  # invalid JSON is dropped: tool markup never reaches content
    assert parse_tool_calls('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', tool_names=SCHEMAS)[1] == []
    _, calls = parse_tool_calls('{"name": "add", "arguments": {"a": 1, "b": 2}}')  # bare JSON call
    assert calls[0].name == "add"
    _, calls = parse_tool_calls('[{"name": "add", "arguments": {}}, {"name": "search", "parameters": {"query": "x"}}]')
    assert [c.name for c in calls] == ["add", "search"] and json.loads(calls[1].arguments) == {"query": "x"}
    _, calls = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}')  # cut at the end
    assert calls[0].name == "add"


def stream(text, sizes):
    """Feed `text` in chunks of the given sizes (cycled); returns (content, calls, raw deltas)."""
    p, deltas, i, k = ToolCallStreamParser(SCHEMAS), [], 0, 0
    while i < len(text):
        n = sizes[k % len(sizes)]
        deltas.append(p.feed(text[i:i + n]))
        i, k = i + n, k + 1
    deltas.append(p.finish())
    content = "".join(d.content or "" for d in deltas)
    calls = {}
    for d in deltas:
        for tc in d.tool_calls:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                assert entry["id"] is None and entry["arguments"] == "", "id + name come first"
                entry.update(id=tc.id, name=tc.name)
            entry["arguments"] += tc.arguments or ""
    return content, calls, deltas


@pytest.mark.parametrize("sizes", [[1], [2, 3], [5, 1, 7], [10_000]])
def test_stream_parser_matches_whole_parse(sizes):
    text = ('Checking <tool call> syntax < and <tool_c without closing. '
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "c"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>')
    content, calls, deltas = stream(text, sizes)
    whole_content, whole_calls = parse_tool_calls(text, SCHEMAS)
    assert content == whole_content == "Checking <tool call> syntax < and <tool_c without closing."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.name, json.loads(c.arguments)) for c in whole_calls]
    first = next(tc for d in deltas for tc in d.tool_calls)
    assert first.to_openai() == {"index": 0, "id": first.id, "type": "function",
                                 "function": {"name": "get_weather", "arguments": ""}}


def test_stream_parser_plain_text_and_unclosed_tag():
    content, calls, _ = stream("Hello there, no tools needed.\n", [3])
    assert content == "Hello there, no tools needed." and not calls
    content, calls, _ = stream("Oops <tool_call>{\"name\": \"add\", \"argu", [4])
    assert content == 'Oops' and not calls  # a block cut off by max_tokens is dropped, never content
    content, calls, _ = stream("ends with <tool_", [2])
    assert content == "ends with <tool_"


def test_parse_reasoning():
    assert parse_reasoning("<think>\nplan it\n</think>\n\n{\"a\": 1}") == ("plan it", '{"a": 1}')
    assert parse_reasoning("plan it</think>answer", starts_in_reasoning=True) == ("plan it", "answer")
    assert parse_reasoning("no thinking here") == (None, "no thinking here")
    assert parse_reasoning("<think>cut off by max_tokens") == ("cut off by max_tokens", "")


@pytest.mark.parametrize("sizes", [[1], [3, 2], [100]])
@pytest.mark.parametrize("text,start", [("<think>\nplan it\n</think>\n\nanswer here", False),
                                        ("plan it</think>answer here", True),
                                        ("answer here, no <think> at start", False),
                                        ("<think>never closes", False)])
def test_reasoning_stream_matches_whole(text, start, sizes):
    p, reasoning, content, i, k = ReasoningStreamParser(start), "", "", 0, 0
    while i < len(text):
        r, c = p.feed(text[i:i + sizes[k % len(sizes)]])
        reasoning, content = reasoning + (r or ""), content + (c or "")
        i, k = i + sizes[k % len(sizes)], k + 1
    r, c = p.finish()
    reasoning, content = reasoning + (r or ""), content + (c or "")
    whole_r, whole_c = parse_reasoning(text, start)
    assert (reasoning.strip() or None, content) == (whole_r or None, whole_c)


def test_inline_tool_messages_for_plain_templates():
    msgs = inline_tool_messages([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    _, calls = parse_tool_calls(msgs[1]["content"])
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert "<tool_response>" in msgs[2]["content"] and "-3 C" in msgs[2]["content"]
