"""The OpenAI-compatible HTTP server: `create_app(engine, cfg)` builds the FastAPI app over any
object with the AsyncLLM interface (tests pass a fake); `run_server(cfg)` serves the real engine
with uvicorn.

Lifecycle: the app's lifespan awaits `engine.start()` and, at exit, `engine.shutdown()`. SIGTERM
(or SIGINT) starts the drain (drain.py): new requests and /health get 503 while in-flight requests
get `ember.drain_timeout_s` seconds; those still running then end with a 503 `server_shutdown` error
(mid-stream: an SSE error event, then `[DONE]`), their engine requests aborted, and the process exits 0.

Deadlines: a `Request-Timeout-Ms` header (milliseconds) or `X-Request-Timeout` (seconds) sets a
deadline, passed to `engine.generate(deadline=...)` as a `time.monotonic()` value; the server also
enforces it. Expired before the response started: HTTP 408 `{"type": "timeout_error", "code":
"request_timeout"}` (as AsyncLLM's own RequestTimeoutError); expired mid-stream: the same error as an SSE error event, then `[DONE]`.
Either way the engine request is aborted. An engine that ends a request itself with
finish_reason "abort" after the deadline is reported the same way."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ember.errors import EngineDeadError, InvalidRequestError
from ember.lora.routes import add_lora_routes
from ember.server.chat import ChatRenderer
from ember.server.drain import DRAIN_GRACE_S, EmberServer
from ember.server.errors import ServiceUnavailableError, ember_error_response, install_error_handlers
from ember.server.limits import ServerSettings, resolve_lora
from ember.server.logprobs import TokenTexts
from ember.server.metrics import CONTENT_TYPE, ServerMetrics
from ember.server.playground import add_playground_routes
from ember.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware, CatchAllMiddleware, DrainingMiddleware
from ember.server.protocol import DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse
from ember.server.openapi import install_openapi
from ember.server.serving import ServerState, dump, encode, parse_body
from ember.server.serving_chat import create_chat_completion
from ember.server.serving_completion import create_completion
from ember.server.serving_encoder import add_encoder_routes
from ember.server.serving_responses import add_responses_routes
from ember.server.streaming import ClientDisconnected

logger = logging.getLogger("ember.server")


def create_app(engine, cfg=None) -> FastAPI:
    settings = ServerSettings.from_config(cfg)
    trust = settings.trust_request_chat_template
    state = ServerState(
        engine=engine,
        settings=settings,
        renderer=ChatRenderer(engine.tokenizer, getattr(engine, "chat_template", None), trust),
        metrics=ServerMetrics(engine),
        texts=TokenTexts(engine.tokenizer),
        vocab_size=len(engine.tokenizer),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await engine.start()
        logger.info("serving %s (max_model_len=%d)", engine.served_model_name, state.max_model_len)
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="ember", lifespan=lifespan)
    app.state.ember = state
    install_error_handlers(app)
    _add_routes(app, state)
    add_lora_routes(app, state, cfg, _guard)  # run-time adapter loading, only when ember.lora_runtime_dir is set
    add_responses_routes(app, state, _guard)  # OpenAI's Responses API over the chat path
    add_encoder_routes(app, state, _guard, getattr(getattr(getattr(cfg, "trt_llm", None), "runtime", None), "webserver_default_route", None))
    add_playground_routes(app)  # the chat page at /
    install_openapi(app)  # /openapi.json with every route's request and response models
    # added innermost first: CatchAll -> ApiKey -> Draining -> BodyLimit -> routes
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(DrainingMiddleware, is_draining=lambda: state.is_draining)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(CatchAllMiddleware)
    return app


async def _guard(state: ServerState, handler, request: Request, needs_engine: bool = True) -> Response:
    """Run a handler; every failure becomes an OpenAI-shaped response, counted in /metrics."""
    try:
        if needs_engine and not state.engine.is_healthy():
            raise EngineDeadError("The engine is not running; the server cannot generate.")
        return await handler(state, request)
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the engine request was aborted
    except Exception as exc:  # noqa: BLE001 - mapped to a status, opaque when unexpected
        response = ember_error_response(exc)
        state.metrics.failed.labels(status=str(response.status_code)).inc()
        return response


def _add_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _guard(state, create_chat_completion, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _guard(state, create_completion, request)

    @app.get("/v1/models")
    async def list_models():
        return dump(ModelList(data=_model_cards(state)))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        async def handler(_state, _request):
            resolve_lora(model_id, engine, strict=True)  # /v1/models lists only what is served
            return JSONResponse(dump(next(c for c in _model_cards(state) if c.id == model_id)))

        return await _guard(state, handler, request, needs_engine=False)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await _guard(state, _tokenize, request, needs_engine=False)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await _guard(state, _detokenize, request, needs_engine=False)

    @app.get("/health")
    async def health():
        if state.is_draining:
            return ember_error_response(ServiceUnavailableError("The server is draining.", code="server_draining"))
        if not _is_healthy(engine):
            return ember_error_response(EngineDeadError("The engine loop is not running."))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def _is_healthy(engine) -> bool:
    try:
        return bool(engine.is_healthy())
    except Exception:  # noqa: BLE001 - a probe that raises means unhealthy
        return False


def _model_cards(state: ServerState) -> list[ModelCard]:
    base = state.engine.served_model_name
    cards = [ModelCard(id=base, root=base, max_model_len=state.max_model_len)]
    cards += [ModelCard(id=name, root=base, parent=base, max_model_len=state.max_model_len) for name in getattr(state.engine, "lora_names", None) or []]
    return cards


async def _tokenize(state: ServerState, request: Request) -> Response:
    req: TokenizeRequest = await parse_body(TokenizeRequest, request)
    resolve_lora(req.model, state.engine, state.settings.strict_model_name)
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequestError("Send exactly one of 'prompt' or 'messages'.", param="prompt")
    if req.messages is not None:
        text = state.renderer.render(req.messages, add_generation_prompt=req.add_generation_prompt)
        add_special = bool(req.add_special_tokens)
    else:
        text = req.prompt
        add_special = req.add_special_tokens is not False
    ids = await encode(state, text, add_special)
    return JSONResponse(dump(TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)))


async def _detokenize(state: ServerState, request: Request) -> Response:
    req: DetokenizeRequest = await parse_body(DetokenizeRequest, request)
    resolve_lora(req.model, state.engine, state.settings.strict_model_name)
    bad = next((t for t in req.tokens if t >= state.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"Token id {bad} is out of range; the vocabulary has {state.vocab_size} tokens.", param="tokens")
    return JSONResponse(dump(DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens))))


KEEP_ALIVE_S = 65  # seconds an idle HTTP/1.1 connection is kept open


def build_server(app: FastAPI, host: str | None = None, port: int | None = None, **uvicorn_kwargs) -> EmberServer:
    state: ServerState = app.state.ember
    s = state.settings
    config = uvicorn.Config(
        app,
        host=host or s.host,
        port=port if port is not None else s.port,
        timeout_graceful_shutdown=DRAIN_GRACE_S,  # after ember's own drain of drain_timeout_s (EmberServer.drain)
        # Idle keep-alive connections stay open longer than a load balancer's or a client pool's idle timeout
        # (60 s is common): with uvicorn's 5 s, a client reusing a connection just as the server closed it got
        # a connection error (seen once in CI: one of 49 requests of a batch, with the client's retries off).
        timeout_keep_alive=KEEP_ALIVE_S,
        lifespan="on",
        # The stdlib event loop and the h11 parser whether or not uvloop/httptools are installed (Ray Serve's
        # extra brings both): ember's streaming, disconnect and abort paths are tested on these, and with
        # uvloop + httptools a storm of 100 streams, half dropped by their clients, left 7 live streams hanging.
        **{"loop": "asyncio", "http": "h11", **uvicorn_kwargs},
    )
    return EmberServer(config, state)


def build_engine(cfg):
    """The engine `cfg` asks for: an EncoderEngine for base_model encoder / encoder_bert (embeddings, rerank,
    classify: batched whole-sequence forwards, no KV cache), else AsyncLLM."""
    from ember.encoder import is_encoder_config

    if is_encoder_config(cfg):
        from ember.encoder.engine import EncoderEngine

        return EncoderEngine(cfg)
    from ember.build.engine_cache import resolve_engine
    from ember.engine.async_engine import AsyncLLM

    return AsyncLLM(resolve_engine(cfg))  # a quantization_type: the cached engine, built on first start


def run_server(cfg) -> None:
    """Serve `cfg` until SIGTERM/SIGINT: the real engine, cfg.ember.host and cfg.ember.port."""
    engine = build_engine(cfg)
    app = create_app(engine, cfg)
    server = build_server(app)
    threading.Thread(target=_exit_when_engine_dies, args=(engine, server), name="ember-watchdog", daemon=True).start()
    server.run()
    reason = server.engine_dead_reason
    if reason is not None:  # a dead engine (e.g. a tensor-parallel worker killed) ends the process, clearly
        _exit_dead(reason)


DEAD_EXIT_GRACE_S = 10.0  # a dead engine's server gets this long to close its connections before a hard exit


def _exit_when_engine_dies(engine, server: EmberServer, poll_s: float = 0.5) -> None:
    """/health already says 503 once the engine is dead; this also stops the server (an orchestrator restarts it).
    Nothing is left to drain (every waiting caller has heard EngineDeadError), so if the orderly stop has not
    ended the process within DEAD_EXIT_GRACE_S (a lifespan hook or a collective stuck on the lost rank), it
    exits hard."""
    while not server.should_exit:
        reason = engine.dead_reason()
        if reason is not None:
            logger.error("engine died (%s); shutting the server down", reason)
            server.should_exit = True
            time.sleep(DEAD_EXIT_GRACE_S)
            _exit_dead(reason)
        time.sleep(poll_s)


def _exit_dead(reason: str) -> None:
    """Exit status 1 at once. Not SystemExit: interpreter teardown can block on a process group whose peer is
    gone (gloo/NCCL destructors) or on joining helper processes, and a dead engine must not linger."""
    print(f"ember serve: the engine died, so the server exited: {reason}", file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(1)
