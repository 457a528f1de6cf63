"""Bad structured-output requests are 400s naming the field, answered at once (no engine work),
while a normal request streams on unharmed, and a normal request right after still works."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
MSGS = [{"role": "user", "content": "Hi"}]
QUICK_S = 5.0  # generous: refusals do no model work; a guard against compiling in the loop, not a benchmark

pytestmark = pytest.mark.anyio


def rf(schema) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


BAD = [
    (rf({"type": "strnig"}), "response_format", "invalid"),
    (rf({"type": "object", "properties": {"a": {"type": "integer", "minimum": "zero"}}}), "response_format", "invalid"),
    (rf({"type": "object", "required": "a"}), "response_format", "invalid"),
    (rf({"not": {"type": "string"}}), "response_format", "'not'"),
    (rf({"type": "array", "uniqueItems": True}), "response_format", "uniqueItems"),
    (rf({"$ref": "#/$defs/missing"}), "response_format", "not supported"),
    (rf(nested(40)), "response_format", "above the limit of 32"),
    (rf({"type": "object", "description": "x" * 70_000}), "response_format", "above the limit of 65536"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", None),
    ({"regex": "(unclosed"}, "regex", "regex"),
    ({"regex": "a{2,1}"}, "regex", "regex"),
    ({"grammar": "root ::= missing_rule"}, "grammar", "grammar"),
    ({"grammar": "not ebnf at all"}, "grammar", "grammar"),
    ({"choice": []}, "choice", "choice"),
    ({"regex": "a+", "choice": ["a"]}, "regex", "Only one"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strnig"}}}]}, "tools", "invalid"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "always"}, "tool_choice", "always"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "'g'"),
    ({"tool_choice": "required"}, "tool_choice", "at least one tool"),
]


async def test_bad_requests_are_quick_400s_while_others_run(live, aclient):
    # a normal request streams the whole time; the refusals must not disturb it
    stream = await aclient.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=48, temperature=0.0,
                                                   stream=True, extra_body={"ignore_eos": True})
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
        async def bad(extra, param, words):
            t0 = time.monotonic()
            r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "max_tokens": 8, **extra})
            elapsed = time.monotonic() - t0
            assert r.status_code == 400, (extra, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == param, (extra, err)
            assert words is None or words in err["message"], err["message"]
            assert elapsed < QUICK_S, f"{param}: refused after {elapsed:.1f}s"

        await asyncio.gather(*(bad(*case) for case in BAD))
        # a body nested far past any parser's comfort: still a 400, never a 500
        schema = '{"type":"object","properties":{"a":' * 5000 + '{"type":"string"}' + "}}" * 5000
        deep = (f'{{"model": "{MODEL}", "messages": {json.dumps(MSGS)}, "response_format": '
                f'{{"type": "json_schema", "json_schema": {{"name": "x", "schema": {schema}}}}}}}')
        r = await http.post("/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    ok = await aclient.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40, temperature=0.0,
                                               response_format={"type": "json_object"})
    assert isinstance(json.loads(ok.choices[0].message.content), dict)
