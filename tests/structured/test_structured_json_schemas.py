"""The issue's bar: 40+ JSON schemas of real-world shapes produce output that validates with jsonschema,
100% of the time, through the default model's tokenizer. A seeded random walker plays the model."""

import json

import jsonschema
import pytest
from structured_schemas import SCHEMAS

from ember.structured.spec import spec_from_response_format

SEEDS = (0, 1)


def test_suite_is_large_enough():
    assert len(SCHEMAS) >= 40


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_outputs_validate(name, backend, walker):
    schema = SCHEMAS[name]
    spec = spec_from_response_format({"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                                             "strict": True}}, {})
    for seed in SEEDS:
        text, _ = walker.run(backend.new_matcher(spec), seed=seed)
        try:
            value = json.loads(text)
        except ValueError:
            pytest.fail(f"{name} seed {seed}: not JSON: {text!r}")
        jsonschema.validate(value, schema)


def test_json_object_outputs_an_object(backend, walker):
    spec = spec_from_response_format({"type": "json_object"}, {})
    for seed in range(3):
        text, _ = walker.run(backend.new_matcher(spec), seed=seed)
        assert isinstance(json.loads(text), dict), text


def test_repeated_schema_compiles_once(backend):
    spec = spec_from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"cache_probe": {"type": "integer"}}}}}, {})
    before = backend.num_compiles
    first = backend.compile(spec)
    again = spec_from_response_format({"type": "json_schema", "json_schema": {"name": "y", "schema": {
        "type": "object", "properties": {"cache_probe": {"type": "integer"}}}}}, {})
    assert backend.compile(again) is first
    assert backend.num_compiles == before + 1
