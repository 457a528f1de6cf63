"""What the chat and completion handlers share: the server's state, request parsing, tokenization
off the event loop for large texts, and the two ways a request runs (to the end, or as a stream
that starts only once the engine accepted it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import Request
from pydantic import BaseModel

from ember.errors import InvalidRequestError
from ember.server.chat import ChatRenderer
from ember.server.drain import LiveStreams
from ember.server.errors import ember_error_body
from ember.server.limits import ServerSettings
from ember.server.logprobs import TokenTexts
from ember.server.metrics import RequestTimer, ServerMetrics
from ember.server.streaming import DONE, OutputStream, SSEResponse, run_until_disconnect, sse, sse_error

_THREAD_TOKENIZE_CHARS = 20_000  # longer texts are tokenized on a worker thread, not the event loop


@dataclass
class ServerState:
    """Everything a handler needs, built once by create_app and kept on app.state.ember."""

    engine: Any
    settings: ServerSettings
    renderer: ChatRenderer
    metrics: ServerMetrics
    texts: TokenTexts
    vocab_size: int | None
    is_draining: bool = False
    live_streams: LiveStreams = field(default_factory=LiveStreams)  # stopped when the drain time ends

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    @property
    def sampling_defaults(self) -> dict:
        """The model's defaults for sampling fields a request leaves out (AsyncLLM.sampling_defaults)."""
        return getattr(self.engine, "sampling_defaults", None) or {}


async def parse_body(model_cls: type[BaseModel], request: Request) -> BaseModel:
    """Parse a JSON body into `model_cls`; malformed JSON and bad fields raise pydantic's
    ValidationError, which the route answers as a 400 naming the field."""
    body = await request.body()
    if not body.strip():
        raise InvalidRequestError("The request body is empty; send a JSON object.", code="invalid_json")
    return model_cls.model_validate_json(body)


async def encode(state: ServerState, text: str, add_special_tokens: bool) -> list[int]:
    tok = state.tokenizer
    if len(text) < _THREAD_TOKENIZE_CHARS:
        return list(tok.encode(text, add_special_tokens=add_special_tokens))
    return list(await anyio.to_thread.run_sync(lambda: tok.encode(text, add_special_tokens=add_special_tokens)))


def dump(model: BaseModel, include_usage: bool = True) -> dict:
    d = model.model_dump(mode="json")
    if not include_usage:
        d.pop("usage", None)
    return d


async def run_to_end(stream: OutputStream, request: Request) -> list:
    """The final output of every prompt; raises ClientDisconnected (after aborting) if the client left."""
    return await run_until_disconnect(stream.collect(), request.receive)


async def start_stream(stream: OutputStream, request: Request) -> None:
    """Submit and wait for the first outputs, so refusals (429, 400, 503) are plain HTTP errors."""
    await run_until_disconnect(stream.start(), request.receive)


def sse_response(chunks: Callable[[], AsyncIterator[dict]], stream: OutputStream, timer: RequestTimer) -> SSEResponse:
    """Serialize a handler's chunk generator as SSE: errors raised inside become an error event,
    `[DONE]` always ends a stream that was not cut off, and the engine stream is always closed."""

    async def body():
        try:
            async for chunk in chunks():
                yield sse(chunk)
        except Exception as exc:  # noqa: BLE001 - the status line is sent; say it in the stream
            status, _ = ember_error_body(exc)
            timer.on_error(status)
            yield sse_error(exc)
        finally:
            await stream.close()
        yield DONE

    return SSEResponse(body())


def finish_reasons(finals: list) -> list[str | None]:
    return [o.finish_reason for f in finals if f is not None for o in f.outputs]
