"""OpenAI's Responses API request, and its translation to a chat-completions request body.

`/v1/responses` runs on the chat path: `to_chat_body()` turns `input` items (messages, function calls and
their outputs), `instructions`, function `tools`, `tool_choice` and `text.format` into the equivalent
/v1/chat/completions body. The server keeps no state (`store: false` semantics), so `previous_response_id`
is refused; a conversation is continued by sending its items again in `input`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ember.errors import InvalidRequestError
from ember.server.errors import NotSupportedError

# chat-path field -> the Responses field a client sent, for error messages
CHAT_TO_RESPONSES_PARAM = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
                           "response_format": "text.format", "tools": "tools", "tool_choice": "tool_choice"}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None


def _text_of(content, param: str) -> str:
    """A message's content: a string, or a list of input_text/output_text parts (other parts are refused)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"'{param}' must be a string or a list of content parts.", param=param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise NotSupportedError(f"'{param}.{j}' is a {kind!r} part; this server takes text parts only.", param=f"{param}.{j}")
        texts.append(part["text"])
    return "".join(texts)


def _messages(req: ResponsesRequest) -> list[dict]:
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    if not req.input:
        raise InvalidRequestError("'input' is an empty list; send at least one message.", param="input")
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        param = f"input.{i}"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequestError(f"'{param}.role' must be user, assistant, system or developer.", param=f"{param}.role")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            if not call["id"] or not isinstance(call["function"]["name"], str):
                raise InvalidRequestError(f"'{param}' needs a call_id and a name.", param=param)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # parallel calls of one turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _text_of(output, f"{param}.output")})
        elif kind == "reasoning":
            continue  # the model's earlier reasoning is not fed back (as chat templates drop it)
        else:
            raise NotSupportedError(f"'{param}' is a {kind!r} item; this server takes message, function_call and "
                                    "function_call_output items.", param=param)
    return messages


def _tools(req: ResponsesRequest) -> list[dict] | None:
    if not req.tools:
        return None
    out = []
    for i, tool in enumerate(req.tools):
        if tool.get("type") != "function":
            raise NotSupportedError(f"'tools.{i}' is a {tool.get('type')!r} tool; this server runs function tools only.", param=f"tools.{i}")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice):
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not choice.get("name"):
            raise NotSupportedError("'tool_choice' must be auto, none, required or {\"type\": \"function\", \"name\": ...}.", param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict | None):
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequestError(f"'text.format.type' {fmt.get('type')!r} is not one of text, json_object, json_schema.", param="text.format.type")


def to_chat_body(req: ResponsesRequest) -> dict:
    """The /v1/chat/completions body that computes this response."""
    if req.previous_response_id is not None:
        raise InvalidRequestError("'previous_response_id' is not supported: this server stores no responses (store: false); "
                                  "send the earlier turns as items in 'input'.", param="previous_response_id")
    body: dict[str, Any] = {"messages": _messages(req), "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    for src, dst in (("model", "model"), ("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                     ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls"), ("user", "user")):
        if getattr(req, src) is not None:
            body[dst] = getattr(req, src)
    tools = _tools(req)
    if tools:
        body["tools"] = tools
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
    fmt = _response_format(req.text)
    if fmt is not None:
        body["response_format"] = fmt
    return body
