"""Tool calls that end: the grammar lets the model stop after a complete call, finish_reason is
"tool_calls" whenever calls are returned, an exact repeat is one call, and no tool markup reaches
`content`, whole or streamed (over the fake engine, which replays a scripted reply byte by byte)."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string

from server_fakes import FakeEngine
from server_support import parse_sse
from ember.structured.tools import tool_calls_ebnf

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
pytestmark = pytest.mark.anyio

MSGS = [{"role": "user", "content": "Weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture
def engine(tokenizer):
    return FakeEngine(tokenizer, max_model_len=4096)  # the tool instruction alone is ~700 byte-tokens


@pytest.mark.parametrize("parallel", [True, False])
def test_grammar_lets_the_model_end_after_a_call(parallel):
    funcs = [t["function"] for t in TOOLS]
    grammar = xgr.Grammar.from_ebnf(tool_calls_ebnf(funcs, parallel=parallel))
    assert _is_grammar_accept_string(grammar, CALL)
    assert _is_grammar_accept_string(grammar, CALL + "\n")  # a newline after the block does not commit to more
    assert _is_grammar_accept_string(grammar, CALL + "\n" + CALL) == parallel
    assert not _is_grammar_accept_string(grammar, "Sure! " + CALL)


# the model repeats its call and is cut mid-block by max_tokens
LOOPING = CALL + "\n" + CALL + "\n" + CALL[:30]


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
async def test_repeated_and_cut_calls(client, engine, tool_choice):
    engine.reply = LOOPING
    body = {"messages": MSGS, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": len(LOOPING.encode())}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]

    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    events = [e for e in parse_sse(r.text) if e != "[DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert not any("<tool_call" in (d.get("content") or "") or "get_weather" in (d.get("content") or "") for d in deltas)
    assert sum(1 for d in deltas for tc in d.get("tool_calls", []) if "id" in tc) == 1
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_bad_block_is_not_content(client, engine):
    engine.reply = "Let me check. <tool_call>\n{\"name\": \"nope\", \"arguments\": {}}\n</tool_call>"
    r = await client.post("/v1/chat/completions", json={"messages": MSGS, "tools": TOOLS, "max_tokens": 200})
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "Let me check." and choice["message"]["tool_calls"] is None
    assert choice["finish_reason"] == "stop"
