"""POST /v1/responses: OpenAI's Responses API over the chat path.

The request becomes a /v1/chat/completions body (responses_protocol.to_chat_body) and runs through
`create_chat_completion` unchanged (templates, tools, structured output, limits, deadlines, metrics); its
answer is reshaped: a chat completion into a `response` object with `output` items (message, function_call,
reasoning), a chat stream into the Responses event stream (response.created, output_item.added,
output_text.delta, function_call_arguments.delta, ..., response.completed). Errors name the Responses
field (`input`, `max_output_tokens`, `text.format`) where the chat path named its own."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ember.errors import EmberError
from ember.server.responses_protocol import CHAT_TO_RESPONSES_PARAM, ResponsesRequest, to_chat_body
from ember.server.limits import resolve_lora
from ember.server.serving import ServerState, parse_body
from ember.server.serving_chat import create_chat_completion
from ember.server.streaming import SSEResponse


def add_responses_routes(app: FastAPI, state: ServerState, guard) -> None:
    @app.post("/v1/responses")
    async def responses(request: Request):
        return await guard(state, create_response, request)


class _ChatRequest(Request):
    """The client's HTTP request (headers, disconnects) carrying the translated chat body."""

    def __init__(self, original: Request, body: bytes):
        super().__init__(original.scope, original.receive)
        self._body = body


async def create_response(state: ServerState, request: Request):
    req: ResponsesRequest = await parse_body(ResponsesRequest, request)
    try:
        body = to_chat_body(req)
        chat = await create_chat_completion(state, _ChatRequest(request, json.dumps(body).encode()))
    except EmberError as exc:
        exc.param = _responses_param(exc.param)
        raise
    resp_id = f"resp_{uuid.uuid4().hex}"
    model = resolve_lora(req.model, state.engine, state.settings.strict_model_name) or state.engine.served_model_name
    if not req.stream:
        completion = json.loads(chat.body)
        items, status, reason = _items_from_message(completion["choices"][0], resp_id)
        return JSONResponse(_response(req, resp_id, model, status, items, reason, completion.get("usage")))
    return SSEResponse(_events(req, chat, resp_id, model), headers={"X-Request-Id": resp_id})


def _responses_param(param: str | None) -> str | None:
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    return CHAT_TO_RESPONSES_PARAM.get(head, head) + dot + rest


def _status(finish_reason: str | None) -> tuple[str, dict | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def _reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _items_from_message(choice: dict, resp_id: str) -> tuple[list[dict], str, dict | None]:
    msg = choice["message"]
    items = []
    if msg.get("reasoning_content"):
        items.append(_reasoning_item(f"rs_{uuid.uuid4().hex}", msg["reasoning_content"]))
    if msg.get("content"):
        items.append(_message_item(f"msg_{uuid.uuid4().hex}", msg["content"]))
    for call in msg.get("tool_calls") or []:
        items.append(_call_item(f"fc_{uuid.uuid4().hex}", call["id"], call["function"]["name"], call["function"]["arguments"]))
    status, reason = _status(choice.get("finish_reason"))
    return items, status, reason


def _usage(usage: dict | None) -> dict | None:
    if usage is None:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


def _response(req: ResponsesRequest, resp_id: str, model: str, status: str, items: list[dict], incomplete: dict | None,
              usage: dict | None, created_at: int | None = None) -> dict:
    return {
        "id": resp_id, "object": "response", "created_at": created_at or int(time.time()), "status": status,
        "model": model, "output": items, "usage": _usage(usage), "error": None, "incomplete_details": incomplete,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
        "previous_response_id": None, "store": False, "temperature": req.temperature, "top_p": req.top_p,
        "text": req.text or {"format": {"type": "text"}}, "tool_choice": req.tool_choice or "auto",
        "tools": req.tools or [], "truncation": "disabled", "user": req.user,
    }


class _EventWriter:
    """Turns chat stream chunks into Responses events, keeping the open output item and the finished ones."""

    def __init__(self, req: ResponsesRequest, resp_id: str, model: str):
        self.req, self.resp_id, self.model = req, resp_id, model
        self.created_at = int(time.time())
        self.seq = 0
        self.items: list[dict] = []  # finished output items
        self.open: dict | None = None  # the item being streamed
        self.finish_reason: str | None = None
        self.usage: dict | None = None

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def response(self, status: str, incomplete=None) -> dict:
        items = self.items if status != "in_progress" else []
        return _response(self.req, self.resp_id, self.model, status, items, incomplete, self.usage, self.created_at)

    def start(self) -> list[str]:
        return [self.event("response.created", response=self.response("in_progress")),
                self.event("response.in_progress", response=self.response("in_progress"))]

    def _open(self, item: dict) -> list[str]:
        out = self.close()
        self.open = item
        index = len(self.items)
        out.append(self.event("response.output_item.added", output_index=index, item={**item, "status": "in_progress"}))
        if item["type"] == "message":
            out.append(self.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        return out

    def close(self) -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        index, out = len(self.items), []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                                  text=part["text"], logprobs=[]))
            out.append(self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part))
        elif item["type"] == "function_call":
            out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  name=item["name"], arguments=item["arguments"]))
        elif item["type"] == "reasoning":
            out.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                                  text=item["content"][0]["text"]))
        self.items.append(item)
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        return out

    def feed(self, chunk: dict) -> list[str]:
        out: list[str] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            index = len(self.items)
            if delta.get("reasoning_content"):
                if self.open is None or self.open["type"] != "reasoning":
                    out += self._open(_reasoning_item(f"rs_{uuid.uuid4().hex}", ""))
                    index = len(self.items)
                self.open["content"][0]["text"] += delta["reasoning_content"]
                out.append(self.event("response.reasoning_text.delta", item_id=self.open["id"], output_index=index,
                                      content_index=0, delta=delta["reasoning_content"]))
            if delta.get("content"):
                if self.open is None or self.open["type"] != "message":
                    out += self._open(_message_item(f"msg_{uuid.uuid4().hex}", ""))
                    index = len(self.items)
                self.open["content"][0]["text"] += delta["content"]
                out.append(self.event("response.output_text.delta", item_id=self.open["id"], output_index=index,
                                      content_index=0, delta=delta["content"], logprobs=[]))
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                if call.get("id"):
                    out += self._open(_call_item(f"fc_{uuid.uuid4().hex}", call["id"], fn.get("name") or "", ""))
                    index = len(self.items)
                if fn.get("arguments") and self.open is not None and self.open["type"] == "function_call":
                    self.open["arguments"] += fn["arguments"]
                    out.append(self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                                          output_index=index, delta=fn["arguments"]))
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def finish(self) -> list[str]:
        out = self.close()
        status, incomplete = _status(self.finish_reason)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + [self.event(kind, response=self.response(status, incomplete))]


async def _events(req: ResponsesRequest, chat: SSEResponse, resp_id: str, model: str):
    writer = _EventWriter(req, resp_id, model)
    chunks = chat.body_iterator
    try:
        for e in writer.start():
            yield e
        async for raw in chunks:
            text = raw.decode() if isinstance(raw, bytes) else raw
            for line in text.splitlines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:  # the chat stream failed mid-way: pass its OpenAI error on (the SDK raises it)
                    yield f"event: error\ndata: {json.dumps(chunk)}\n\n"
                    return
                for e in writer.feed(chunk):
                    yield e
        for e in writer.finish():
            yield e
    finally:
        await chunks.aclose()  # closes the chat stream, which aborts an unfinished engine request
