"""POST /v1/completions: a prompt as a string, a list of strings, token ids (list[int]) or lists of
token ids; one engine request per prompt, choice index = prompt_index * n + sequence index.
`echo` puts the prompt text before the completion (and, with `logprobs`, its tokens' teacher-forced
logprobs from the prefill, null for the first token, before the completion's); `max_tokens: 0` with `echo`
returns just the prompt (lm-evaluation-harness loglikelihood): one token is generated and dropped. Streams: text deltas, then a chunk with empty text and the finish_reason
for each choice, the usage chunk when asked for, `data: [DONE]`."""

from __future__ import annotations

import time
import uuid

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from ember.errors import InvalidRequestError
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
from ember.server.logprobs import completion_logprobs, make_usage, prompt_logprobs_out
from ember.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from ember.server.serving import ServerState, dump, encode, finish_reasons, parse_body, run_to_end, sse_response, start_stream
from ember.server.streaming import Job, OutputStream
from ember.server.structured import build_spec, needs_structured_work, warm_grammar


async def _prompts(state: ServerState, req: CompletionRequest) -> list[tuple[str, list[int]]]:
    """(prompt text, prompt token ids) for each prompt of the request."""
    p = req.prompt
    if p is None:  # OpenAI's default prompt is its document separator: start a document unconditioned
        tok = state.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise InvalidRequestError("prompt is required: this model's tokenizer has no BOS or EOS token to start from.", param="prompt")
        p = [start]
    if isinstance(p, str):
        items: list = [p]
    elif p and isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    if not items:
        raise InvalidRequestError("prompt is an empty list; send at least one prompt.", param="prompt")
    if len(items) > state.settings.max_prompts:
        raise InvalidRequestError(f"prompt has {len(items)} prompts; the limit is {state.settings.max_prompts}.", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = await encode(state, item, add_special_tokens=True)
            check_prompt(ids, state.settings, state.max_model_len, None, "prompt")
            out.append((item, ids))
        else:
            check_prompt(item, state.settings, state.max_model_len, state.vocab_size, "prompt")
            out.append((None, list(item)))
    return out


async def create_completion(state: ServerState, request: Request):
    req: CompletionRequest = await parse_body(CompletionRequest, request)
    engine, settings = state.engine, state.settings
    lora = resolve_lora(req.model, engine, settings.strict_model_name)
    check_supported(req)
    check_limits(req, settings)
    check_logit_bias(req, state.vocab_size)
    deadline, timeout_s = parse_deadline(request.headers)
    spec = None
    if needs_structured_work(req):  # response_format / regex / grammar / choice: checked and compiled off the event loop
        spec = await anyio.to_thread.run_sync(_prepare_spec, state, req)
    prompts = await _prompts(state, req)
    num_logprobs = req.logprobs
    # echo + logprobs: the prompt tokens' logprobs, from the prefill forward itself
    prompt_logprobs = num_logprobs if req.echo and num_logprobs is not None else None
    request_id = f"cmpl-{uuid.uuid4().hex}"
    jobs = []
    for i, (_, ids) in enumerate(prompts):
        # max_tokens=0 (echo only): one token is generated and dropped, so the prefill runs and finishes as usual
        max_tokens = max(1, resolve_max_tokens(req, len(ids), state.max_model_len, settings))
        jobs.append(Job(f"{request_id}-{i}", ids, sampling_params(req, max_tokens, num_logprobs, spec, prompt_logprobs,
                                                                 defaults=state.sampling_defaults), lora))
    if req.echo:  # token-id prompts are echoed as their decoded text
        prompts = [(text if text is not None else state.tokenizer.decode(ids), ids) for text, ids in prompts]
    model = lora or engine.served_model_name  # the served name, whatever `model` said
    timer = state.metrics.timer()
    stream = OutputStream(engine, jobs, deadline, timeout_s, timer, state.live_streams)
    if not req.stream:
        finals = await run_to_end(stream, request)
        timer.on_finish(finish_reasons(finals))
        return JSONResponse(dump(_response(state, req, finals, prompts, request_id, model)), headers={"X-Request-Id": request_id})

    await start_stream(stream, request)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    response = sse_response(lambda: _chunks(state, req, stream, timer, prompts, request_id, model, include_usage), stream, timer)
    response.headers["X-Request-Id"] = request_id
    return response


def _prepare_spec(state: ServerState, req: CompletionRequest):
    spec = build_spec(req, state.settings)
    warm_grammar(state.engine, spec)
    return spec


def _response(state, req: CompletionRequest, finals, prompts, request_id: str, model: str) -> CompletionResponse:
    choices = []
    for p, final in enumerate(finals):
        prompt_text, prompt_ids = prompts[p]
        for o in final.outputs:
            drop = req.max_tokens == 0  # echo only: the generated token is not returned
            logprobs = None
            if req.logprobs is not None:
                echo_ids = prompt_ids if req.echo else None
                logprobs, _ = completion_logprobs([] if drop else o.logprobs or [], state.texts, 0, echo_ids,
                                                  final.prompt_logprobs)
            text = "" if drop else o.text
            text = (prompt_text + text) if req.echo else text
            extra = prompt_logprobs_out(final.prompt_logprobs, state.texts, req.prompt_logprobs) \
                if req.prompt_logprobs is not None else None
            choices.append(CompletionChoice(index=p * req.n + o.index, text=text, logprobs=logprobs, finish_reason=o.finish_reason,
                                            prompt_logprobs=extra))
    return CompletionResponse(id=request_id, model=model, choices=choices, usage=_usage(finals, req.max_tokens == 0))


def _usage(finals, is_echo_only: bool = False):
    finals = [f for f in finals if f is not None]
    return make_usage(
        sum(len(f.prompt_token_ids) for f in finals),
        0 if is_echo_only else sum(len(o.token_ids) for f in finals for o in f.outputs),
        sum(f.num_cached_tokens for f in finals),
    )


async def _chunks(state, req: CompletionRequest, stream: OutputStream, timer, prompts, request_id, model, include_usage: bool):
    created = int(time.time())
    n, num_choices = req.n, len(prompts) * req.n

    def chunk(choices, usage=None) -> dict:
        return dump(CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage), include_usage)

    sent_chars, sent_logprobs, offsets = [0] * num_choices, [0] * num_choices, [0] * num_choices
    is_done, is_started = [False] * num_choices, [False] * num_choices
    finals: list = [None] * len(prompts)
    async for p, out in stream:
        finals[p] = out
        for o in out.outputs:
            c = p * n + o.index
            if is_done[c]:
                continue
            if req.echo and not is_started[c] and out.prompt_logprobs is not None \
                    and len(out.prompt_logprobs) < len(prompts[p][1]) and o.finish_reason is None:
                continue  # the prompt is echoed once its logprobs are all in (the prefill may run in chunks)
            drop = req.max_tokens == 0  # echo only: the generated token is not returned
            delta = "" if drop else o.text_from(sent_chars[c])
            new_logprobs = (o.logprobs or [])[sent_logprobs[c]:] if req.logprobs is not None and not drop else []
            echo_ids = None
            if req.echo and not is_started[c]:
                delta = prompts[p][0] + delta
                echo_ids = prompts[p][1]
            if delta or new_logprobs or echo_ids:
                logprobs = None
                if req.logprobs is not None:
                    logprobs, offsets[c] = completion_logprobs(new_logprobs, state.texts, offsets[c], echo_ids,
                                                               out.prompt_logprobs)
                yield chunk([CompletionChoice(index=c, text=delta, logprobs=logprobs)])
                is_started[c] = True
                sent_chars[c] = max(sent_chars[c], o.num_chars)
                sent_logprobs[c] += len(new_logprobs)
            if o.finish_reason is not None:
                is_done[c] = True
                yield chunk([CompletionChoice(index=c, text="", finish_reason=o.finish_reason)])
    timer.on_finish(finish_reasons(finals))
    if include_usage:
        yield chunk([], _usage(finals, req.max_tokens == 0))
