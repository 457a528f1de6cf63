"""POST /v1/chat/completions: messages -> chat template -> token ids -> engine -> OpenAI response.

Streams go out as OpenAI sends them: per choice a first chunk with the role, then content deltas
(with their logprobs), then a chunk with an empty delta and the finish_reason; with
stream_options.include_usage every chunk carries `"usage": null` and a last chunk has no choices
and the usage; `data: [DONE]` ends it. With tools or reasoning, deltas go through a
`ChatOutputParser`: `reasoning_content` deltas, content deltas, and each tool call as a chunk with its
id and name followed by one with its arguments (finish_reason "tool_calls")."""

from __future__ import annotations

import time
import uuid

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from ember.server.limits import (
    check_limits,
    check_logit_bias,
    check_prompt,
    check_supported,
    parse_deadline,
    resolve_lora,
    resolve_max_tokens,
    sampling_params,
)
from ember.server.logprobs import chat_logprobs, make_usage, prompt_logprobs_out
from ember.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
)
from ember.server.serving import ServerState, dump, encode, finish_reasons, parse_body, run_to_end, sse_response, start_stream
from ember.server.streaming import Job, OutputStream
from ember.server.structured import (
    ChatOutputMetadata,
    ChatOutputParser,
    build_spec,
    chat_finish_reason,
    needs_structured_work,
    parse_chat_output,
    reasoning_mode,
    warm_grammar,
)
from ember.structured.tools import normalize_tools, resolve_tool_choice


async def create_chat_completion(state: ServerState, request: Request):
    req: ChatCompletionRequest = await parse_body(ChatCompletionRequest, request)
    engine, settings = state.engine, state.settings
    lora = resolve_lora(req.model, engine, settings.strict_model_name)
    check_supported(req)
    check_limits(req, settings)
    check_logit_bias(req, state.vocab_size)
    deadline, timeout_s = parse_deadline(request.headers)
    if needs_structured_work(req):  # schema checks, tool rendering and grammar compiles: off the event loop
        text, meta = await anyio.to_thread.run_sync(_prepare_structured, state, req)
    else:
        text = state.renderer.render(
            req.messages,
            add_generation_prompt=req.add_generation_prompt,
            request_template=req.chat_template,
            template_kwargs=req.chat_template_kwargs,
        )
        meta = _metadata(state, req, text)
    prompt_ids = await encode(state, text, add_special_tokens=False)  # the template wrote BOS if it wants one
    check_prompt(prompt_ids, settings, state.max_model_len, None, "messages")
    max_tokens = resolve_max_tokens(req, len(prompt_ids), state.max_model_len, settings)
    num_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, max_tokens, num_logprobs, meta.spec, defaults=state.sampling_defaults)

    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    model = lora or engine.served_model_name  # the served name, whatever `model` said
    timer = state.metrics.timer()
    stream = OutputStream(engine, [Job(request_id, prompt_ids, params, lora)], deadline, timeout_s, timer, state.live_streams)
    if not req.stream:
        (final,) = await run_to_end(stream, request)
        timer.on_finish(finish_reasons([final]))
        return JSONResponse(dump(_response(state, final, request_id, model, num_logprobs, meta, req.prompt_logprobs)), headers={"X-Request-Id": request_id})

    await start_stream(stream, request)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    response = sse_response(lambda: _chunks(state, stream, timer, request_id, model, req.n, num_logprobs, include_usage, meta), stream, timer)
    response.headers["X-Request-Id"] = request_id
    return response


def _metadata(state: ServerState, req: ChatCompletionRequest, text: str, spec=None, tool_names=None) -> ChatOutputMetadata:
    is_reasoning, starts = reasoning_mode(text, state.renderer.source_for(req.chat_template))
    return ChatOutputMetadata(spec, tool_names, is_reasoning, starts)


def _prepare_structured(state: ServerState, req: ChatCompletionRequest) -> tuple[str, ChatOutputMetadata]:
    """(prompt text, metadata) for a request with tools or a structured-output field; runs on a
    worker thread. Every refusal is a 400 naming tools / tool_choice / response_format / regex / ..."""
    funcs = normalize_tools(req.tools) if req.tools else []
    choice = resolve_tool_choice(req.tool_choice, funcs)
    shown = [t.model_dump(exclude_none=True) for t in req.tools] if funcs and choice != "none" else None
    text = state.renderer.render(
        req.messages,
        add_generation_prompt=req.add_generation_prompt,
        tools=shown,
        request_template=req.chat_template,
        template_kwargs=req.chat_template_kwargs,
    )
    meta = _metadata(state, req, text, tool_names=frozenset(f["name"] for f in funcs) if shown else None)
    meta.spec = build_spec(req, state.settings, tools=shown, tool_choice=req.tool_choice,
                           is_reasoning=meta.is_reasoning)
    warm_grammar(state.engine, meta.spec)
    return text, meta


def _message(text: str, finish_reason: str | None, meta: ChatOutputMetadata) -> tuple[AssistantMessage, str | None]:
    if meta.is_plain:
        return AssistantMessage(content=text), finish_reason
    parsed = parse_chat_output(text, meta)
    message = AssistantMessage(content=parsed.content, reasoning_content=parsed.reasoning_content, tool_calls=parsed.tool_calls or None)
    return message, chat_finish_reason(finish_reason, bool(parsed.tool_calls))


def _response(state: ServerState, final, request_id: str, model: str, num_logprobs: int | None, meta: ChatOutputMetadata,
              prompt_k: int | None = None) -> ChatCompletionResponse:
    choices = []
    for o in final.outputs:
        message, finish_reason = _message(o.text, o.finish_reason, meta)
        logprobs = chat_logprobs(o.logprobs or [], state.texts) if num_logprobs is not None else None
        choices.append(ChatChoice(index=o.index, message=message, logprobs=logprobs, finish_reason=finish_reason))
    num_completion = sum(len(o.token_ids) for o in final.outputs)
    usage = make_usage(len(final.prompt_token_ids), num_completion, final.num_cached_tokens)
    extra = prompt_logprobs_out(final.prompt_logprobs, state.texts, prompt_k) if prompt_k is not None else None
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage, prompt_logprobs=extra)


async def _chunks(state: ServerState, stream: OutputStream, timer, request_id: str, model: str, n: int, num_logprobs, include_usage: bool,
                  meta: ChatOutputMetadata):
    created = int(time.time())

    def chunk(choices, usage=None) -> dict:
        return dump(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage), include_usage)

    for i in range(n):
        yield chunk([ChatStreamChoice(index=i, delta={"role": "assistant", "content": "", "refusal": None})])
    sent_chars, sent_logprobs, is_done = [0] * n, [0] * n, [False] * n
    parsers = [None if meta.is_plain else ChatOutputParser(meta) for _ in range(n)]
    final = None
    async for _, out in stream:
        final = out
        for o in out.outputs:
            i = o.index
            if is_done[i]:
                continue
            delta = o.text_from(sent_chars[i])
            new_logprobs = (o.logprobs or [])[sent_logprobs[i]:] if num_logprobs is not None else []
            if parsers[i] is None:
                pieces = [{"content": delta}] if delta or new_logprobs else []
            else:
                pieces = parsers[i].feed(delta) if delta else []
                if new_logprobs and not pieces:
                    pieces = [{}]  # the text is held back (a possible tag); its logprobs go out now
            logprobs = chat_logprobs(new_logprobs, state.texts) if num_logprobs is not None else None
            for j, piece in enumerate(pieces):
                yield chunk([ChatStreamChoice(index=i, delta=piece, logprobs=logprobs if j == 0 else None)])
            sent_chars[i] = max(sent_chars[i], o.num_chars)
            sent_logprobs[i] += len(new_logprobs)
            if o.finish_reason is not None:
                is_done[i] = True
                finish_reason = o.finish_reason
                if parsers[i] is not None:
                    for piece in parsers[i].finish():
                        yield chunk([ChatStreamChoice(index=i, delta=piece)])
                    finish_reason = chat_finish_reason(finish_reason, parsers[i].has_calls)
                yield chunk([ChatStreamChoice(index=i, delta={}, finish_reason=finish_reason)])
    if final is not None:
        timer.on_finish(finish_reasons([final]))
        if include_usage:
            num_completion = sum(len(o.token_ids) for o in final.outputs)
            yield chunk([], make_usage(len(final.prompt_token_ids), num_completion, final.num_cached_tokens))
