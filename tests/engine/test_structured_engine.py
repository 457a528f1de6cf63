"""Structured outputs through the real engine on the default model: every output validates."""

import json
import re

import jsonschema
import pytest

from ember import LLM, SamplingParams
from ember.structured import StructuredOutputSpec

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3}},
     "required": ["city", "tags"]},
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}, "ok": {"type": "boolean"}},
                                "required": ["x", "ok"]}, "maxItems": 2},
]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


def test_json_schema_outputs_validate_in_a_mixed_batch(llm):
    prompts, params = [], []
    for s in SCHEMAS:
        prompts.append(CHAT.format("Describe a person as JSON."))
        params.append(SamplingParams(max_tokens=96, temperature=0.7, seed=1,
                                     structured=StructuredOutputSpec(json_schema=json.dumps(s))))
    prompts.append(CHAT.format("Say hello."))  # unconstrained, same batch
    params.append(SamplingParams(max_tokens=16, temperature=0))
    outs = llm.generate(prompts, params)
    for s, o in zip(SCHEMAS, outs):
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), s)
    assert outs[-1].text


def test_regex_and_choice(llm):
    outs = llm.generate([CHAT.format("Give a date."), CHAT.format("Is the sky blue?")],
                        [SamplingParams(max_tokens=20, temperature=0, structured=StructuredOutputSpec(regex=r"\d{4}-\d{2}-\d{2}")),
                         SamplingParams(max_tokens=8, temperature=0, structured=StructuredOutputSpec(choice=["yes", "no"]))])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", outs[0].text)
    assert outs[1].text in ("yes", "no")
