"""Structured outputs, tools and reasoning on the server side: what a request's `response_format` /
`regex` / `grammar` / `choice` / `tools` / `tool_choice` fields become, and how the generated text
is read back into OpenAI's message fields.

In: the request. Out, before generation: a `StructuredOutputSpec` for `SamplingParams.structured`
(the handler validates and compiles it on a worker thread, so a large schema never stalls the
event loop, and a bad one is a 400 before the engine sees the request) and a `ChatOutputMetadata` saying how to read
the output. After generation: `parse_chat_output` (a whole message) or `ChatOutputParser` (a
stream of deltas) split the text into `reasoning_content`, `content` and `tool_calls`.

Decisions: tool_choice "none" keeps the tools out of the prompt and parses nothing; "auto" leaves
the output free and parses `<tool_call>` blocks afterwards; "required" / a named function constrain
the output to valid calls (that wins over a response_format in the same request). Any call found
makes finish_reason "tool_calls"; tool markup never reaches `content`. A model reasons when
its rendered prompt ends in `<think>` or its template knows `</think>` and the prompt does not
already close it; the constraint then starts after `</think>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ember.structured.spec import StructuredOutputSpec, spec_from_response_format
from ember.structured.tool_parser import (
    THINK_BEGIN,
    THINK_END,
    ReasoningStreamParser,
    ToolCallStreamParser,
    parse_reasoning,
    parse_tool_calls,
)

_EXTRA_FIELDS = ("regex", "grammar", "choice")


@dataclass
class ChatOutputMetadata:
    """How one request's output is constrained and read back."""

    spec: StructuredOutputSpec | None = None  # the grammar constraint (None: free text)
    tool_names: frozenset[str] | None = None  # parse <tool_call> blocks of these tools; None: no tool parsing
    is_reasoning: bool = False  # the model thinks first: split reasoning_content off the output
    starts_in_reasoning: bool = False  # the prompt already opened <think>

    @property
    def is_plain(self) -> bool:
        return self.tool_names is None and not self.is_reasoning


def reasoning_mode(prompt_text: str, template_source: str | None) -> tuple[bool, bool]:
    """(is_reasoning, starts_in_reasoning) for a rendered chat prompt."""
    tail = prompt_text.rstrip()
    starts = tail.endswith(THINK_BEGIN)
    return starts or (THINK_END in (template_source or "") and not tail.endswith(THINK_END)), starts


def _response_format_dict(req) -> dict | None:
    rf = req.response_format
    return None if rf is None else rf.model_dump(exclude_none=True)


def build_spec(req, settings, *, tools: list[Any] | None = None, tool_choice: Any = None,
               is_reasoning: bool = False) -> StructuredOutputSpec | None:
    """The request's constraint: a forced tool call, else response_format / regex / grammar / choice.
    Raises InvalidRequestError naming the field."""
    from ember.structured.tools import tool_call_spec

    extra = {name: getattr(req, name, None) for name in _EXTRA_FIELDS}
    spec = spec_from_response_format(_response_format_dict(req), extra, reasoning=is_reasoning,
                                     max_bytes=settings.max_schema_bytes, max_depth=settings.max_schema_depth)
    if tools:  # OpenAI-format tools (the prompt shows them)
        forced = tool_call_spec(tools, tool_choice, getattr(req, "parallel_tool_calls", None), reasoning=is_reasoning)
        if forced is not None:
            return forced
    return spec


def needs_structured_work(req) -> bool:
    """Whether the request has any structured-output or tools field (else the fast path is taken)."""
    rf = req.response_format
    return ((rf is not None and rf.type != "text") or any(getattr(req, n, None) is not None for n in _EXTRA_FIELDS)
            or bool(getattr(req, "tools", None)) or getattr(req, "tool_choice", None) is not None)


def warm_grammar(engine, spec: StructuredOutputSpec | None) -> None:
    """Compile `spec` into the engine's grammar cache now (call it on a worker thread), so neither the
    event loop nor the engine thread compiles it; a grammar that fails to compile is a 400 here."""
    backend = getattr(engine, "grammar", None)  # AsyncLLM's GrammarBackend (the core compiles its own copy)
    if spec is not None and backend is not None:
        backend.compile(spec)


# ---- reading the output back ---------------------------------------------------------------------
@dataclass
class ParsedChatOutput:
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI tool-call dicts


def parse_chat_output(text: str, meta: ChatOutputMetadata) -> ParsedChatOutput:
    """A whole generated message -> reasoning, content, tool calls."""
    reasoning = None
    if meta.is_reasoning:
        reasoning, text = parse_reasoning(text, meta.starts_in_reasoning)
    if meta.tool_names is None:
        return ParsedChatOutput(text, reasoning)
    content, calls = parse_tool_calls(text, meta.tool_names)
    return ParsedChatOutput(content, reasoning, [c.to_openai() for c in calls])


def chat_finish_reason(finish_reason: str | None, has_calls: bool) -> str | None:
    """"tool_calls" whenever calls are returned (also when max_tokens cut what followed them: clients'
    agent loops key on it); else the engine's reason."""
    return "tool_calls" if has_calls and finish_reason is not None else finish_reason


class ChatOutputParser:
    """Streaming `parse_chat_output` for one choice: text deltas in, OpenAI delta dicts out."""

    def __init__(self, meta: ChatOutputMetadata):
        self.reasoning = ReasoningStreamParser(meta.starts_in_reasoning) if meta.is_reasoning else None
        self.tools = ToolCallStreamParser(meta.tool_names) if meta.tool_names is not None else None
        self._reasoning_ws = ""  # trailing whitespace of the reasoning, held: dropped if </think> follows

    @property
    def has_calls(self) -> bool:
        return bool(self.tools and self.tools.calls)

    def feed(self, delta: str) -> list[dict]:
        reasoning, content = self.reasoning.feed(delta) if self.reasoning else (None, delta)
        return self._deltas(reasoning, content, final=False)

    def finish(self) -> list[dict]:
        reasoning, content = self.reasoning.finish() if self.reasoning else (None, None)
        return self._deltas(reasoning, content, final=True)

    def _deltas(self, reasoning: str | None, content: str | None, final: bool) -> list[dict]:
        out: list[dict] = []
        if reasoning:
            text = self._reasoning_ws + reasoning
            kept = text.rstrip()
            self._reasoning_ws = text[len(kept):]
            if kept:
                out.append({"reasoning_content": kept})
        if self.tools is None:
            if content:
                out.append({"content": content})
            return out
        parts = [self.tools.feed(content)] if content else []
        if final:
            parts.append(self.tools.finish())
        for part in parts:
            if part.content:
                out.append({"content": part.content})
            # one call fragment per chunk, as OpenAI streams them: id + name first, then the arguments
            out.extend({"tool_calls": [d.to_openai()]} for d in part.tool_calls)
        return out
