"""spec_from_response_format: what is accepted, and a 400 naming the field for everything else."""

import json

import pytest

from ember.errors import InvalidRequestError
from ember.structured.spec import StructuredOutputSpec, spec_from_response_format


def js(schema, **kw):
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, **kw}}


def bad(rf, extra=None, param="response_format", words=(), **kw):
    with pytest.raises(InvalidRequestError) as e:
        spec_from_response_format(rf, extra or {}, **kw)
    assert e.value.param == param, e.value.message
    for w in words:
        assert w in e.value.message, e.value.message
    assert e.value.status_code == 400
    return e.value.message


def test_text_and_none_are_free():
    assert spec_from_response_format(None, {}) is None
    assert spec_from_response_format({"type": "text"}, {"regex": None}) is None


def test_accepted_kinds():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    s = spec_from_response_format(js(schema, strict=True), {})
    assert s.kind == "json_schema" and list(json.loads(s.json_schema)["properties"]) == ["b", "a"]  # order kept
    assert spec_from_response_format({"type": "json_object"}, {}).json_object
    assert spec_from_response_format(None, {"regex": "[a-z]+"}).regex == "[a-z]+"
    assert spec_from_response_format(None, {"grammar": 'root ::= "x"'}).grammar
    assert spec_from_response_format(None, {"choice": ["a", "b", "a"]}).choice == ("a", "b")
    assert spec_from_response_format({"type": "json_object"}, {}, reasoning=True).reasoning
    assert spec_from_response_format(js(schema), {}) == spec_from_response_format(js(schema), {})  # hashable key


def test_spec_needs_exactly_one_kind():
    with pytest.raises(ValueError):
        StructuredOutputSpec()
    with pytest.raises(ValueError):
        StructuredOutputSpec(regex="a", json_object=True)


def test_bad_type_and_shape():
    bad({"type": "xml"}, words=["xml"])
    bad({"type": "json_schema"}, words=["json_schema"])
    bad({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, words=["name"])
    bad(js({"type": "object"}, strict="yes"), words=["strict"])
    bad("json", words=["type"])


def test_invalid_schemas_name_the_problem():
    bad(js({"type": "strnig"}), words=["invalid", "type"])
    bad(js({"type": "object", "required": "a"}), words=["required"])
    bad(js({"$ref": "#/$defs/missing"}), words=["missing"])
    bad(js({"type": "integer", "minimum": 5, "maximum": 1}), words=["minimum"])
    bad(js({"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 1}), words=["minItems"])
    bad(js({"type": "string", "pattern": "[a-"}), words=["pattern"])
    bad(js("{not json"), words=["not valid JSON"])
    bad(js([1, 2]), words=["object"])


@pytest.mark.parametrize("schema,word", [
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "properties": {"a": {"if": {"type": "string"}, "then": {"minLength": 2}}}}, "if"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
])
def test_unenforceable_keywords_are_refused(schema, word):
    msg = bad(js(schema), words=[word])
    assert "#" in msg  # names where


def test_too_large_and_too_deep():
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 50} for i in range(50)}}
    bad(js(big), words=["bytes", "limit of 1000"], max_bytes=1000)
    deep = {"type": "string"}
    for _ in range(20):
        deep = {"type": "object", "properties": {"a": deep}}
    bad(js(deep), words=["deep", "limit of 32"])
    assert spec_from_response_format(js(deep), {}, max_depth=64) is not None
    bad(None, {"regex": "a" * 200}, param="regex", words=["bytes"], max_bytes=100)
    bad(None, {"grammar": 'root ::= "' + "a" * 200 + '"'}, param="grammar", words=["bytes"], max_bytes=100)
    bad(None, {"choice": ["a" * 60, "b" * 60]}, param="choice", words=["bytes"], max_bytes=100)


def test_bad_extra_fields():
    bad(None, {"regex": "(ab"}, param="regex", words=["regex", "parenthesis"])
    bad(None, {"regex": "(?=a)b"}, param="regex", words=["Lookahead"])
    bad(None, {"regex": 5}, param="regex")
    bad(None, {"grammar": 'root ::= "a" | b'}, param="grammar", words=["b"])
    bad(None, {"grammar": 'start ::= "a"'}, param="grammar", words=["root"])
    bad(None, {"choice": []}, param="choice")
    bad(None, {"choice": ["a", 3]}, param="choice")
    bad(None, {"choice": ["a"], "regex": "a"}, param="regex", words=["Only one"])
    bad({"type": "json_object"}, {"choice": ["a"]}, param="choice", words=["Only one"])
