"""response_format through the real server and the official openai client: 40+ JSON schemas of
real-world shapes (tests/structured/structured_schemas.py), sampled at temperature 0.7 with a seed,
all sent concurrently; every output must parse and validate with jsonschema. Also json_object,
regex, choice and EBNF grammar, /v1/completions, and the SDK's `parse(response_format=Model)`."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from typing import Annotated

import jsonschema
import pytest
from pydantic import BaseModel, Field
from structured_schemas import SCHEMAS

MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 400
BATCH = 24  # requests in flight at once
STRING_MAX = 24
ITEMS_MAX = 4

pytestmark = pytest.mark.anyio


def bounded(schema):
    """The schema with free strings, integers, arrays and map keys bounded, so a 135M model cannot
    run past max_tokens inside one value. Every output valid for it is valid for the original."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, list):
            for x in node:
                walk(x)
            return
        if not isinstance(node, dict):
            return
        types = node.get("type")
        types = types if isinstance(types, list) else [types]
        free = not any(k in node for k in ("enum", "const", "pattern", "format"))
        if "string" in types and free and "maxLength" not in node:
            node["maxLength"] = STRING_MAX
        if "integer" in types and "maximum" not in node and "exclusiveMaximum" not in node:
            node["maximum"] = 10**6
        if "integer" in types and "minimum" not in node and "exclusiveMinimum" not in node:
            node["minimum"] = -(10**6)
        if "array" in types and "maxItems" not in node and node.get("items") is not False:
            node["maxItems"] = ITEMS_MAX
        if "object" in types and node.get("additionalProperties") not in (None, False) and "propertyNames" not in node:
            node["propertyNames"] = {"maxLength": 12}
        for v in node.values():
            walk(v)

    walk(schema)
    return schema


def tree(depth: int) -> dict:
    """recursive_tree unrolled `depth` levels: recursion has no length keyword to bound it with."""
    children = {"type": "array", "maxItems": 0 if depth == 0 else 2, "items": tree(depth - 1) if depth else {}}
    return {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "children": children},
            "required": ["name", "children"], "additionalProperties": False}


SENT = {name: bounded(schema) for name, schema in SCHEMAS.items()} | {"recursive_tree": tree(3)}


def prompt_for(name: str, schema: dict) -> list[dict]:
    return [{"role": "user", "content": f"Write one example '{name.replace('_', ' ')}' as JSON for this schema: "
                                        f"{json.dumps(schema)}"}]


async def test_json_schemas_validate(aclient):
    assert len(SCHEMAS) >= 40

    async def one(i: int, name: str):
        schema = SENT[name]
        r = await aclient.chat.completions.create(
            model=MODEL, messages=prompt_for(name, schema), temperature=0.7, seed=1000 + i, max_tokens=MAX_TOKENS,
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})
        choice = r.choices[0]
        assert choice.finish_reason == "stop", f"{name}: cut at {r.usage.completion_tokens} tokens: {choice.message.content!r}"
        try:
            value = json.loads(choice.message.content)
        except ValueError:
            pytest.fail(f"{name}: not JSON: {choice.message.content!r}")
        jsonschema.validate(value, schema)
        jsonschema.validate(value, SCHEMAS[name])
        return name

    names = sorted(SCHEMAS)
    results = []
    for start in range(0, len(names), BATCH):
        results += await asyncio.gather(*(one(start + i, n) for i, n in enumerate(names[start:start + BATCH])),
                                        return_exceptions=True)
    failures = [f"{n}: {r}" for n, r in zip(names, results) if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} of {len(names)} schemas failed:\n" + "\n".join(failures)


async def test_other_constraints(aclient):
    """json_object, regex, choice and grammar (extra fields), and response_format on /v1/completions."""
    ask = [{"role": "user", "content": "Describe a cat as JSON."}]
    kw = {"model": MODEL, "temperature": 0.7, "seed": 7, "max_tokens": 200}
    grammar = 'root ::= "The answer is " [0-9] [0-9]? "."'
    obj, regex, choice, gram, comp = await asyncio.gather(
        aclient.chat.completions.create(messages=ask, response_format={"type": "json_object"}, **kw),
        aclient.chat.completions.create(messages=[{"role": "user", "content": "A phone number?"}],
                                        extra_body={"regex": r"\+1-[0-9]{3}-[0-9]{4}"}, **kw),
        aclient.chat.completions.create(messages=[{"role": "user", "content": "Is the sky blue?"}],
                                        extra_body={"choice": ["yes", "no", "it depends"]}, **kw),
        aclient.chat.completions.create(messages=[{"role": "user", "content": "What is 6 times 7?"}],
                                        extra_body={"grammar": grammar}, **kw),
        aclient.completions.create(prompt="A JSON point:", extra_body={"response_format": {
            "type": "json_schema", "json_schema": {"name": "p", "schema": bounded(SCHEMAS["geojson_point"])}}}, **kw),
    )
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    assert re.fullmatch(r"\+1-[0-9]{3}-[0-9]{4}", regex.choices[0].message.content)
    assert choice.choices[0].message.content in ("yes", "no", "it depends")
    assert re.fullmatch(r"The answer is [0-9][0-9]?\.", gram.choices[0].message.content)
    jsonschema.validate(json.loads(comp.choices[0].text), SCHEMAS["geojson_point"])
    for r in (obj, regex, choice, gram, comp):
        assert r.choices[0].finish_reason == "stop"


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population: int = Field(ge=0, le=10**8)
    landmarks: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)


def test_sdk_parse(client):
    """`client.chat.completions.parse` (and the older `client.beta.chat.completions.parse`, where the
    SDK still has it) send the model's strict schema and return a parsed object."""
    messages = [{"role": "user", "content": "Describe Paris as JSON with name, country, population, landmarks."}]
    parsers = [client.chat.completions.parse]
    beta = getattr(getattr(getattr(client, "beta", None), "chat", None), "completions", None)
    if beta is not None and hasattr(beta, "parse"):
        parsers.append(beta.parse)
    for parse in parsers:
        r = parse(model=MODEL, messages=messages, response_format=City, temperature=0.7, seed=3, max_tokens=MAX_TOKENS)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop" and isinstance(msg.parsed, City), msg.content
        assert msg.parsed == City.model_validate_json(msg.content)
