"""What a request's output must look like: one `StructuredOutputSpec`, validated from OpenAI's
`response_format` (text / json_object / json_schema) or the vLLM-style extra fields `regex`,
`grammar` and `choice`.

Everything a user can get wrong is caught here, before the request reaches the engine: the spec
is bounded (text size, schema nesting depth), the schema is checked against its metaschema, keywords
that constrained decoding cannot enforce are refused (so that an accepted schema always yields
valid output), and the grammar is built once (tokenizer-free) so that unsupported constructs are a
400 naming the field, never a failure inside the engine loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ember.errors import InvalidRequestError

MAX_SPEC_BYTES = 64 * 1024  # default of LimitsConfig.max_schema_bytes
MAX_SCHEMA_DEPTH = 32  # default of LimitsConfig.max_schema_depth
MAX_CHOICES = 1024  # entries of `choice`

# Keywords xgrammar would silently ignore: accepting them would break the "always valid" promise.
_UNENFORCEABLE = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
                  "contains", "minContains", "maxContains")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("additionalProperties", "items", "propertyNames", "unevaluatedProperties",
                  "unevaluatedItems", "additionalItems")


@dataclass(frozen=True)
class StructuredOutputSpec:
    """Exactly one of json_schema / json_object / regex / grammar / choice. Frozen and hashable: the
    grammar backend caches compiled grammars keyed by the spec (minus `reasoning`)."""

    json_schema: str | None = None  # canonical JSON text of the schema (key order kept: it orders output)
    json_object: bool = False  # any JSON object
    regex: str | None = None  # the whole output matches it (xgrammar's regex dialect)
    grammar: str | None = None  # EBNF (xgrammar's GBNF dialect), start rule `root`
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings
    reasoning: bool = False  # unconstrained until the model closes </think>, constrained after

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [self.json_schema is not None, self.json_object, self.regex is not None,
                 self.grammar is not None, self.choice is not None]
        if sum(kinds) != 1:
            raise ValueError("StructuredOutputSpec needs exactly one of json_schema, json_object, regex, "
                             "grammar, choice")

    @property
    def kind(self) -> str:
        for name in ("json_schema", "regex", "grammar", "choice"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    @property
    def cache_key(self) -> tuple:
        """What determines the compiled grammar (reasoning only changes the matcher)."""
        return (self.kind, self.json_schema, self.regex, self.grammar, self.choice)


def spec_from_response_format(response_format: dict | None, extra: dict | None = None, *, reasoning: bool = False,
                              max_bytes: int = MAX_SPEC_BYTES, max_depth: int = MAX_SCHEMA_DEPTH
                              ) -> StructuredOutputSpec | None:
    """Validates `response_format` (a dict as OpenAI sends it; None or type "text": no constraint) and
    `extra` = {"regex": ..., "grammar": ..., "choice": ...} (None values ignored). Returns the spec, or
    None when the output is free. Raises InvalidRequestError naming the field at fault."""
    extra = {k: v for k, v in (extra or {}).items() if v is not None and k in ("regex", "grammar", "choice")}
    rf = response_format or {}
    if not isinstance(rf, dict):
        raise InvalidRequestError("response_format must be an object with a 'type' field.", param="response_format")
    rf_type = rf.get("type", "text")
    constrained = ([] if rf_type == "text" else ["response_format"]) + sorted(extra)
    if len(constrained) > 1:
        raise InvalidRequestError(f"Only one structured-output constraint may be given; got {', '.join(constrained)}.",
                                  param=constrained[1])
    if "regex" in extra:
        return StructuredOutputSpec(regex=_check_regex(extra["regex"], max_bytes), reasoning=reasoning)
    if "grammar" in extra:
        return StructuredOutputSpec(grammar=_check_grammar(extra["grammar"], max_bytes), reasoning=reasoning)
    if "choice" in extra:
        return StructuredOutputSpec(choice=_check_choice(extra["choice"], max_bytes), reasoning=reasoning)
    if rf_type == "text":
        return None
    if rf_type == "json_object":
        return StructuredOutputSpec(json_object=True, reasoning=reasoning)
    if rf_type != "json_schema":
        raise InvalidRequestError(f"response_format.type '{rf_type}' is not one of 'text', 'json_object', "
                                  f"'json_schema'.", param="response_format")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise InvalidRequestError("response_format.json_schema must be an object with 'name' and 'schema'.",
                                  param="response_format")
    name = js.get("name")
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)):
        raise InvalidRequestError("response_format.json_schema.name must be 1 to 64 letters, digits, '_' or '-'.",
                                  param="response_format")
    schema = js.get("schema", {})  # OpenAI: omitted schema means any JSON
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError("response_format.json_schema.strict must be a boolean.", param="response_format")
    text = check_json_schema(schema, "response_format", max_bytes, max_depth)
    return StructuredOutputSpec(json_schema=text, reasoning=reasoning)


def check_json_schema(schema: Any, param: str, max_bytes: int = MAX_SPEC_BYTES,
                      max_depth: int = MAX_SCHEMA_DEPTH) -> str:
    """Bounds, metaschema check, enforceable keywords, and a trial conversion; returns canonical text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise InvalidRequestError(f"The JSON schema is not valid JSON: {e}.", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError("The JSON schema must be an object.", param=param)
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > max_bytes:
        raise InvalidRequestError(f"The JSON schema is {len(text.encode())} bytes, above the limit of {max_bytes}.",
                                  param=param)
    depth = _nesting_depth(schema)
    if depth > max_depth:
        raise InvalidRequestError(f"The JSON schema nests {depth} levels deep, above the limit of {max_depth}.",
                                  param=param)
    import jsonschema  # the metaschema check: catches {"type": "strnig"}, a non-list "required", ...
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise InvalidRequestError(f"The JSON schema is invalid at {where}: {e.message}.", param=param) from None
    _check_enforceable(schema, "#", param)
    import xgrammar as xgr
    _trial(lambda: xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True), "JSON schema", param)
    return text


def _check_enforceable(schema: Any, path: str, param: str) -> None:
    if not isinstance(schema, dict):
        return
    for key in _UNENFORCEABLE:
        if key in schema:
            raise InvalidRequestError(f"The JSON schema uses '{key}' at {path}, which constrained decoding cannot "
                                      f"enforce; remove it.", param=param)
    if schema.get("uniqueItems") is True:
        raise InvalidRequestError(f"The JSON schema uses 'uniqueItems' at {path}, which constrained decoding cannot "
                                  f"enforce; remove it.", param=param)
    if "multipleOf" in schema and (schema.get("type") != "integer" or not isinstance(schema["multipleOf"], int)):
        raise InvalidRequestError(f"The JSON schema uses 'multipleOf' at {path}; only integer multipleOf on "
                                  f"'type': 'integer' is supported.", param=param)
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        raise InvalidRequestError(f"The JSON schema uses 'allOf' with several entries at {path}, which is not "
                                  f"supported; merge them into one schema.", param=param)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                _check_enforceable(sub, f"{path}/{key}/{name}", param)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                _check_enforceable(sub, f"{path}/{key}/{i}", param)
    for key in _SUBSCHEMA_ONE:
        _check_enforceable(schema.get(key), f"{path}/{key}", param)


def _nesting_depth(obj: Any) -> int:
    """Depth of nested objects/arrays in a JSON value (iterative: a hostile document cannot recurse us)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in node)
    return deepest


def _check_regex(regex: Any, max_bytes: int) -> str:
    import xgrammar as xgr

    if not isinstance(regex, str) or not regex:
        raise InvalidRequestError("regex must be a non-empty string.", param="regex")
    return _check_source(regex, max_bytes, "regex", xgr.Grammar.from_regex)


def _check_grammar(grammar: Any, max_bytes: int) -> str:
    import xgrammar as xgr

    if not isinstance(grammar, str) or not grammar.strip():
        raise InvalidRequestError("grammar must be a non-empty EBNF string with a 'root' rule.", param="grammar")
    return _check_source(grammar, max_bytes, "grammar", xgr.Grammar.from_ebnf)


def _check_source(source: str, max_bytes: int, param: str, compile_source) -> str:
    """A regex or EBNF text of at most max_bytes that xgrammar compiles (else a 400 naming `param`)."""
    size = len(source.encode())
    if size > max_bytes:
        raise InvalidRequestError(f"{param} is {size} bytes, above the limit of {max_bytes}.", param=param)
    _trial(lambda: compile_source(source), param, param)
    return source


def _check_choice(choice: Any, max_bytes: int) -> tuple[str, ...]:
    if not isinstance(choice, (list, tuple)) or not choice or not all(isinstance(c, str) and c for c in choice):
        raise InvalidRequestError("choice must be a non-empty list of non-empty strings.", param="choice")
    if len(choice) > MAX_CHOICES:
        raise InvalidRequestError(f"choice has {len(choice)} entries, above the limit of {MAX_CHOICES}.",
                                  param="choice")
    size = sum(len(c.encode()) for c in choice)
    if size > max_bytes:
        raise InvalidRequestError(f"choice totals {size} bytes, above the limit of {max_bytes}.", param="choice")
    return tuple(dict.fromkeys(choice))  # deduplicated, order kept


def choice_to_ebnf(choice: tuple[str, ...]) -> str:
    """`root ::= "a" | "b"` with every character escaped for xgrammar's EBNF string literals."""
    return "root ::= " + " | ".join(f'"{_ebnf_escape(c)}"' for c in choice)


def _ebnf_escape(s: str) -> str:
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def xgrammar_error_message(e: BaseException) -> str:
    """xgrammar's C++ errors start with '[time] /path/file.cc:line: '; keep the human part."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", msg).rstrip(".")


def _trial(build, what: str, param: str) -> None:
    try:
        build()
    except Exception as e:  # xgrammar raises RuntimeError / ValueError with a parser message
        raise InvalidRequestError(f"The {what} is not supported: {xgrammar_error_message(e)}.", param=param) from None
