"""Function calling, independent of the server: putting tools in the prompt, and the grammar that
forces a valid call when `tool_choice` is `required` or names a function.

The output format is Hermes / Qwen style, one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Models whose chat template renders `tools` get them through the template; for the others
`add_tools_to_messages` adds a built-in system instruction that describes the tools and this
format. `tool_choice="auto"` leaves the output free and `parse_tool_calls` (tool_parser.py)
recognises calls afterwards; `required` / named choices constrain the output to well-formed calls
of the allowed tools, arguments matching each tool's parameters schema.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from ember.errors import InvalidRequestError
from ember.structured.spec import MAX_SCHEMA_DEPTH, MAX_SPEC_BYTES, StructuredOutputSpec, check_json_schema
from ember.structured.tool_parser import (  # noqa: F401  (re-exported: one import site for the server)
    ParsedToolCall, ReasoningStreamParser, StreamDelta, ToolCallDelta, ToolCallStreamParser, parse_reasoning,
    parse_tool_calls,
)

TOOL_CALL_BEGIN = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_INSTRUCTION = """# Tools

You may call one or more functions to help with the user's request. The functions are described by \
JSON schemas inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, reply with one <tool_call></tool_call> block per call, each holding a JSON object \
with the function's name and its arguments, and nothing else around it:
<tool_call>
{{"name": "<function-name>", "arguments": {{<arguments as JSON, matching the function's parameters>}}}}
</tool_call>
When no function is needed, answer the user directly in plain text, without any <tool_call> block."""


def normalize_tools(tools: list[Any] | None) -> list[dict]:
    """OpenAI `tools` (dicts or pydantic models) -> validated function dicts {name, description?,
    parameters}. Raises InvalidRequestError(param="tools") naming the bad entry."""
    out: list[dict] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools or []):
        if hasattr(tool, "model_dump"):
            tool = tool.model_dump(exclude_none=True)
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidRequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}.", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequestError(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '.' or '-'.",
                                      param="tools")
        if name in seen:
            raise InvalidRequestError(f"tools[{i}].function.name '{name}' is given twice.", param="tools")
        seen.add(name)
        params = fn.get("parameters")
        params = {"type": "object", "properties": {}} if params is None else params
        check_json_schema(params, "tools", MAX_SPEC_BYTES, MAX_SCHEMA_DEPTH)
        entry = {"name": name, "parameters": params}
        if fn.get("description"):
            entry["description"] = str(fn["description"])
        out.append(entry)
    if len(out) > MAX_TOOLS:
        raise InvalidRequestError(f"tools has {len(out)} entries, above the limit of {MAX_TOOLS}.", param="tools")
    return out


def render_tools_system_prompt(tools: list[Any]) -> str:
    """The built-in instruction for models whose chat template does not render tools."""
    lines = [json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in normalize_tools(tools)]
    return _INSTRUCTION.format(tools="\n".join(lines))


def add_tools_to_messages(messages: list[dict], tools: list[Any]) -> list[dict]:
    """Messages with the tool instruction merged into the system message (a new one when absent)."""
    prompt = render_tools_system_prompt(tools)
    messages = [dict(m) for m in messages]
    if messages and messages[0].get("role") in ("system", "developer") and isinstance(messages[0].get("content"), str):
        messages[0]["content"] = messages[0]["content"].rstrip() + "\n\n" + prompt
    else:
        messages.insert(0, {"role": "system", "content": prompt})
    return messages


def inline_tool_messages(messages: list[dict]) -> list[dict]:
    """For templates that know nothing of tools: an assistant message's `tool_calls` become
    `<tool_call>` blocks in its text, and `tool` results become user turns in `<tool_response>`."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            blocks = []
            for tc in m.pop("tool_calls"):
                fn = tc.get("function", tc)
                args = fn.get("arguments", {})
                args = json.loads(args) if isinstance(args, str) and args.strip() else (args or {})
                blocks.append(f"{TOOL_CALL_BEGIN}\n" + json.dumps({"name": fn.get("name"), "arguments": args},
                                                                   ensure_ascii=False) + f"\n{TOOL_CALL_END}")
            m["content"] = "\n".join(filter(None, [m.get("content") or "", *blocks]))
        elif m.get("role") == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    return out


def template_supports_tools(chat_template: str | None) -> bool:
    """Heuristic: the template reads the `tools` variable in a Jinja expression or statement (string
    literals inside the tags do not count: "use the tools" is not a variable)."""
    if not chat_template:
        return False
    for tag in re.findall(r"\{[{%](.*?)[}%]\}", chat_template, flags=re.DOTALL):
        code = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "", tag)
        if re.search(r"(?<![.\w])tools\b", code):
            return True
    return False


def resolve_tool_choice(tool_choice: Any, tools: list[dict]) -> str | None:
    """`tool_choice` -> "none" | "auto" | "required", or the forced function's name. Defaults as OpenAI:
    "auto" when tools are given, "none" otherwise."""
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump(exclude_none=True)
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise InvalidRequestError(f"tool_choice '{tool_choice}' is not one of 'none', 'auto', 'required' or "
                                      f"{{'type': 'function', 'function': {{'name': ...}}}}.", param="tool_choice")
        if tool_choice == "required" and not tools:
            raise InvalidRequestError("tool_choice 'required' needs at least one tool in tools.", param="tool_choice")
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise InvalidRequestError("tool_choice must name a function as {'type': 'function', 'function': {'name': ...}}.",
                                  param="tool_choice")
    if name not in {t["name"] for t in tools}:
        raise InvalidRequestError(f"tool_choice names the function '{name}', which is not in tools.",
                                  param="tool_choice")
    return name


def tool_call_spec(tools: list[Any] | None, tool_choice: Any = None, parallel_tool_calls: bool | None = True,
                   reasoning: bool = False) -> StructuredOutputSpec | None:
    """The constraint for a tool_choice: None for "none" / "auto" (free text, parsed afterwards); for
    "required", one call (or, with parallel_tool_calls, one or more) of any tool; for a named function,
    exactly one call of it. The result is an EBNF grammar spec (compiled and cached like any other)."""
    funcs = normalize_tools(tools)
    choice = resolve_tool_choice(tool_choice, funcs)
    if choice in ("none", "auto"):
        return None
    if choice != "required":
        funcs = [f for f in funcs if f["name"] == choice]
    return StructuredOutputSpec(grammar=tool_calls_ebnf(funcs, parallel=choice == "required" and
                                                        parallel_tool_calls is not False), reasoning=reasoning)


def tool_calls_ebnf(funcs: list[dict], parallel: bool) -> str:
    """EBNF for `<tool_call>\\n{"name": N, "arguments": ARGS}\\n</tool_call>` blocks separated by a
    newline, N one of the functions and ARGS compact JSON valid for its parameters schema."""
    return _tool_calls_ebnf(json.dumps(funcs, sort_keys=False), parallel)


@lru_cache(maxsize=256)
def _tool_calls_ebnf(funcs_json: str, parallel: bool) -> str:
    import xgrammar as xgr
    from xgrammar.structural_tag import GrammarFormat, StructuralTag, TagFormat, TagsWithSeparatorFormat

    tags = []
    for f in json.loads(funcs_json):
        args = xgr.Grammar.from_json_schema(json.dumps(f["parameters"]), any_whitespace=False, strict_mode=True)
        begin = f'{TOOL_CALL_BEGIN}\n{{"name": {json.dumps(f["name"])}, "arguments": '
        tags.append(TagFormat(begin=begin, content=GrammarFormat(grammar=str(args)), end=f"}}\n{TOOL_CALL_END}"))
    fmt = TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True, stop_after_first=not parallel)
    ebnf = str(xgr.Grammar.from_structural_tag(StructuralTag(format=fmt)))
    # After any complete call the model may end, also after the newline a template writes after a block:
    # a newline must not commit it to another call (a small model would then repeat calls to max_tokens).
    calls_rule = "tool_calls_root"
    lines = [calls_rule + line[len("root"):] if line.startswith("root ::=") else line for line in ebnf.splitlines()]
    assert any(line.startswith(calls_rule) for line in lines), "xgrammar's structural-tag EBNF has no root rule"
    return "\n".join(lines) + f'\nroot ::= {calls_rule} ("\\n")?\n'
