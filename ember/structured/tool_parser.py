"""Reading tool calls and reasoning out of generated text, whole or as a stream of deltas.

Tool calls are `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes / Qwen
style). Tool markup never reaches the content: a block whose JSON is not a call of a given tool, or
one cut off by max_tokens, is dropped, and a call that repeats an earlier one exactly (same name,
same arguments) is dropped too (a small model looping on one call did not ask for it twice). `parse_tool_calls` runs the same
state machine as `ToolCallStreamParser`, so a streamed response and a whole one agree. Reasoning is
the text before `</think>` (a leading `<think>` is dropped).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Iterable

TOOL_CALL_BEGIN = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = field(default_factory=new_tool_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """One entry of a stream chunk's `delta.tool_calls`: the first for a call carries id and name
    (arguments ""), the next ones carry argument fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None

    def to_openai(self) -> dict:
        fn = {k: v for k, v in (("name", self.name), ("arguments", self.arguments)) if v is not None}
        out: dict = {"index": self.index}
        if self.id is not None:
            out.update(id=self.id, type="function")
        out["function"] = fn
        return out


@dataclass
class StreamDelta:
    content: str | None = None  # text outside tool calls, None when there is none
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.content and not self.tool_calls


def parse_call_json(text: str, tool_names: set[str] | None = None) -> ParsedToolCall | None:
    """`{"name": ..., "arguments": {...}}` (also "parameters", or arguments as JSON text) -> a call."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if tool_names is not None and obj["name"] not in tool_names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallStreamParser:
    """Text deltas in, OpenAI stream deltas out. Content is passed through as it comes, except a tail
    that could be the start of `<tool_call>` (held until it can't) and whitespace next to calls
    (dropped, as OpenAI sends content null around calls). A call is emitted when its block closes:
    first id + name, then its arguments."""

    def __init__(self, tool_names: Iterable[str] | None = None):
        self.tool_names = set(tool_names) if tool_names is not None else None
        self.calls: list[ParsedToolCall] = []  # complete calls so far
        self._buf = ""  # text not yet handed out
        self._in_call = False
        self._pending_ws = ""  # whitespace held until non-whitespace content follows it
        self._has_content = False

    def feed(self, delta: str) -> StreamDelta:
        out = StreamDelta()
        self._buf += delta
        while True:
            if not self._in_call:
                i = self._buf.find(TOOL_CALL_BEGIN)
                if i >= 0:
                    self._content(out, self._buf[:i], before_call=True)
                    self._buf, self._in_call = self._buf[i + len(TOOL_CALL_BEGIN):], True
                    continue
                keep = _partial_suffix(self._buf, TOOL_CALL_BEGIN)
                self._content(out, self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return out
            j = self._buf.find(TOOL_CALL_END)
            if j < 0:
                return out
            inner, self._buf, self._in_call = self._buf[:j], self._buf[j + len(TOOL_CALL_END):], False
            self._close_call(out, inner)

    def finish(self) -> StreamDelta:
        """End of output: an unclosed call (cut by max_tokens) is a call if its JSON is complete,
        else dropped; a held tail is content."""
        out = StreamDelta()
        rest, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            self._close_call(out, rest)
        else:
            self._content(out, rest)
        return out

    def _close_call(self, out: StreamDelta, inner: str) -> None:
        call = parse_call_json(inner.strip(), self.tool_names)
        if call is None or any((c.name, c.arguments) == (call.name, call.arguments) for c in self.calls):
            return  # markup is never content; an exact repeat is not a second call
        self._pending_ws = ""
        index = len(self.calls)
        self.calls.append(call)
        out.tool_calls.append(ToolCallDelta(index, id=call.id, name=call.name, arguments=""))
        out.tool_calls.append(ToolCallDelta(index, arguments=call.arguments))

    def _content(self, out: StreamDelta, text: str, before_call: bool = False) -> None:
        if not text:
            return
        if not text.strip():
            self._pending_ws = "" if before_call else self._pending_ws + text
            return
        if not self._has_content:
            self._pending_ws, text = "", text.lstrip()
        stripped = text.rstrip()
        piece = self._pending_ws + stripped
        self._pending_ws = "" if before_call else text[len(stripped):]
        self._has_content = True
        out.content = (out.content or "") + piece


def parse_tool_calls(text: str, tool_names: Iterable[str] | None = None) -> tuple[str | None, list[ParsedToolCall]]:
    """Whole output -> (content or None, calls). Besides `<tool_call>` blocks, an output that is as a
    whole one JSON call object (or a list of them) is read as calls."""
    parser = ToolCallStreamParser(tool_names)
    parts = [parser.feed(text), parser.finish()]
    content = "".join(p.content or "" for p in parts) or None
    if not parser.calls and content is not None:
        bare = _bare_json_calls(content.strip(), parser.tool_names)
        if bare:
            return None, bare
    return content, parser.calls


def _bare_json_calls(text: str, tool_names: set[str] | None) -> list[ParsedToolCall]:
    if not text.startswith(("{", "[")):
        return []
    try:
        obj = json.loads(text)
    except ValueError:
        return []
    items = obj if isinstance(obj, list) else [obj]
    calls = [parse_call_json(json.dumps(o), tool_names) for o in items]
    return calls if calls and all(c is not None for c in calls) else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ---- reasoning -----------------------------------------------------------------------------------
def parse_reasoning(text: str, starts_in_reasoning: bool = False) -> tuple[str | None, str]:
    """Whole output -> (reasoning_content or None, content). The output reasons when it opens with
    `<think>`, or when `starts_in_reasoning` (the prompt already opened it); reasoning runs to
    `</think>` (to the end when it never closes)."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_BEGIN):
        text, starts_in_reasoning = stripped[len(THINK_BEGIN):], True
    if not starts_in_reasoning:
        return None, text
    end = text.find(THINK_END)
    if end < 0:
        return text.strip(), ""
    return text[:end].strip(), text[end + len(THINK_END):].lstrip()


class ReasoningStreamParser:
    """Streaming `parse_reasoning`: feed text deltas, get (reasoning delta, content delta) pairs."""

    def __init__(self, starts_in_reasoning: bool = False):
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._buf = ""
        self._skip_ws = True  # strip whitespace at the start of reasoning and of content

    def feed(self, delta: str) -> tuple[str | None, str | None]:
        self._buf += delta
        reasoning = content = ""
        if self._state == "start":
            s = self._buf.lstrip()
            if s.startswith(THINK_BEGIN):
                self._buf, self._state = s[len(THINK_BEGIN):], "reasoning"
            elif THINK_BEGIN.startswith(s):
                return None, None  # could still open with <think>
            else:
                self._state = "content"
                self._skip_ws = False
        if self._state == "reasoning":
            end = self._buf.find(THINK_END)
            if end >= 0:
                reasoning, self._buf, self._state = self._buf[:end].rstrip(), self._buf[end + len(THINK_END):], "content"
                reasoning = self._lead(reasoning)
                self._skip_ws = True
            else:
                keep = _partial_suffix(self._buf, THINK_END)
                reasoning, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                return self._lead(reasoning) or None, None
        if self._state == "content":
            content, self._buf = self._lead(self._buf), ""
        return reasoning or None, content or None

    def finish(self) -> tuple[str | None, str | None]:
        rest, self._buf = self._buf, ""
        if self._state == "reasoning":
            return self._lead(rest) or None, None
        return None, self._lead(rest) or None

    def _lead(self, text: str) -> str:
        if self._skip_ws:
            text = text.lstrip()
            self._skip_ws = not text
        return text
