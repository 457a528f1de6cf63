"""The OpenAPI document at /openapi.json: each route's request and response models, published as data.

The routes parse their bodies themselves (ember.server.serving.parse_body, so a bad field is OpenAI's 400 naming it,
never FastAPI's 422), which leaves FastAPI's generated document without request bodies and with `{}` responses.
`install_openapi` fills them in from the same pydantic models the handlers validate and serialize with: the request
body of every POST route, the 200 body (JSON, and the SSE stream where `stream: true` is possible) and the OpenAI
error body for every error status. Only routes the app really mounts are described (LoRA loading, for one, exists
only with `ember.lora_runtime_dir`). Documentation only: nothing here validates or reshapes a response.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ember.server.encoder_protocol import EmbeddingRequest, EmbeddingResponse, PredictRequest, Prediction, \
    RerankRequest, RerankResult
from ember.server.protocol import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, \
    CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelCard, ModelList, \
    TokenizeRequest, TokenizeResponse
from ember.server.responses_protocol import ResponsesRequest

# statuses a generation route answers with an OpenAI error body (408: request deadline, 413: body too large, 429:
# queue full, 503: engine dead or draining); "default" covers the rest (405, ...)
ENGINE_ERRORS = ("400", "401", "404", "408", "413", "429", "500", "503")
PLAIN_ERRORS = ("400", "401", "404", "413", "500", "503")


@dataclass(frozen=True)
class RouteDoc:
    summary: str
    request: type[BaseModel] | None = None
    ok: object = None  # a model, or a JSON schema (dict) built with `ref`
    stream: type[BaseModel] | None = None  # the model of each SSE `data:` event when the body asks for a stream
    ok_media: str = "application/json"
    errors: tuple[str, ...] = PLAIN_ERRORS
    extra_models: tuple[type[BaseModel], ...] = ()  # models only its `ok` schema references


def ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


_LORA_STATUS = {"type": "object", "required": ["object", "id", "status"], "properties": {
    "object": {"const": "lora_adapter"}, "id": {"type": "string"}, "status": {"enum": ["loaded", "unloaded"]}}}
_LORA_BODY = {"type": "object", "required": ["lora_name"], "properties": {
    "lora_name": {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,128}$"}, "lora_path": {"type": "string"}}}

ROUTES: dict[tuple[str, str], RouteDoc] = {
    ("/v1/chat/completions", "post"): RouteDoc(
        "Chat completion (OpenAI)", ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk,
        errors=ENGINE_ERRORS),
    ("/v1/completions", "post"): RouteDoc(
        "Text completion (OpenAI)", CompletionRequest, CompletionResponse, CompletionResponse, errors=ENGINE_ERRORS),
    ("/v1/responses", "post"): RouteDoc(
        "Responses API (OpenAI), served over the chat path", ResponsesRequest,
        {"type": "object", "required": ["id", "object", "status", "output"],
         "properties": {"id": {"type": "string"}, "object": {"const": "response"}, "status": {"type": "string"},
                        "model": {"type": "string"}, "output": {"type": "array", "items": {"type": "object"}}}},
        errors=ENGINE_ERRORS),
    ("/v1/models", "get"): RouteDoc("The served model and its LoRA adapters", ok=ModelList),
    ("/v1/models/{model_id}", "get"): RouteDoc("One served model", ok=ModelCard),
    ("/tokenize", "post"): RouteDoc("Text or messages -> token ids", TokenizeRequest, TokenizeResponse),
    ("/detokenize", "post"): RouteDoc("Token ids -> text", DetokenizeRequest, DetokenizeResponse),
    ("/health", "get"): RouteDoc("200 while the engine runs; 503 when it is dead or the server drains",
                                 ok={"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}),
    ("/metrics", "get"): RouteDoc("Prometheus metrics (ember_* and vllm:* names)", ok={"type": "string"},
                                  ok_media="text/plain"),
    ("/v1/embeddings", "post"): RouteDoc("Embeddings (OpenAI); encoder configs only", EmbeddingRequest,
                                         EmbeddingResponse),
    ("/rerank", "post"): RouteDoc("Rerank (TEI); encoder configs only", RerankRequest,
                                  {"type": "array", "items": ref(RerankResult)}, extra_models=(RerankResult,)),
    ("/predict", "post"): RouteDoc(
        "Classification (TEI); encoder configs only (or the route webserver_default_route names)", PredictRequest,
        {"anyOf": [{"type": "array", "items": ref(Prediction)},
                   {"type": "array", "items": {"type": "array", "items": ref(Prediction)}}]},
        extra_models=(Prediction,)),
    ("/v1/load_lora_adapter", "post"): RouteDoc("Load a LoRA adapter from ember.lora_runtime_dir", None,
                                                _LORA_STATUS),
    ("/v1/unload_lora_adapter", "post"): RouteDoc("Unload a LoRA adapter", None, _LORA_STATUS),
}
RAW_BODIES = {"/v1/load_lora_adapter": _LORA_BODY, "/v1/unload_lora_adapter": _LORA_BODY}


def _components() -> dict:
    """Every model the routes name, as OpenAPI component schemas (nested models hoisted beside them)."""
    requests, responses = set(), {ErrorResponse}
    for doc in ROUTES.values():
        if doc.request is not None:
            requests.add(doc.request)
        for m in (doc.ok, doc.stream, *doc.extra_models):
            if isinstance(m, type):
                responses.add(m)
    pairs = [(m, "validation") for m in sorted(requests, key=lambda m: m.__name__)]
    pairs += [(m, "serialization") for m in sorted(responses, key=lambda m: m.__name__)]
    _, schema = models_json_schema(pairs, ref_template="#/components/schemas/{model}")
    return schema.get("$defs", {})


def _body_schema(ok) -> dict:
    return ref(ok) if isinstance(ok, type) else ok


def _document(doc: RouteDoc, path: str, op: dict) -> None:
    op["summary"] = doc.summary
    if doc.request is not None or path in RAW_BODIES:
        schema = ref(doc.request) if doc.request is not None else RAW_BODIES[path]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    content = {doc.ok_media: {"schema": _body_schema(doc.ok)}}
    if doc.stream is not None:
        content["text/event-stream"] = {"schema": {
            "type": "string", "description": f"with `stream: true`: server-sent events, each `data:` a "
            f"{doc.stream.__name__} (an ErrorResponse if the stream fails), then `data: [DONE]`"}}
    error = {"description": "An error, in OpenAI's shape", "content": {"application/json": {"schema": ref(ErrorResponse)}}}
    op["responses"] = {"200": {"description": "Success", "content": content},
                       **{status: error for status in doc.errors}, "default": error}


def install_openapi(app: FastAPI) -> None:
    """Replace `app.openapi` with one that documents every mounted route's bodies (built once, on first request)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title="ember", version=_version(), routes=app.routes,
                                 description="OpenAI-compatible LLM server (see README, HTTP API)")
            schema.setdefault("components", {})["schemas"] = _components()
            for path, item in schema.get("paths", {}).items():
                for method, op in item.items():
                    doc = ROUTES.get((path, method))
                    if doc is not None:
                        _document(doc, path, op)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ember")
    except PackageNotFoundError:
        return "0"
