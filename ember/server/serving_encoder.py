"""POST /v1/embeddings, /rerank and /predict over an `EncoderEngine` (ember/encoder/engine.py).

Inputs are tokenized here (pairs with their segment ids), checked against the model's limit (400 naming it
unless the request says `truncate`), sent to the engine as whole sequences, and the rows it returns are
shaped as OpenAI (embeddings) or TEI (rerank, predict) answer. `runtime.webserver_default_route` picks what
POST /predict serves for an embedding or reranking model, as Baseten routes its default endpoint."""

from __future__ import annotations

import base64
import threading

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ember.encoder.runner import EncoderInput
from ember.errors import ContextLengthExceededError, InvalidRequestError
from ember.server.encoder_protocol import (
    MAX_INPUTS,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    Prediction,
    PredictRequest,
    RerankRequest,
    RerankResult,
)
from ember.server.limits import resolve_lora
from ember.server.serving import ServerState, parse_body
from ember.server.streaming import run_until_disconnect

_TRUNCATE_LOCK = threading.Lock()  # truncation_side is tokenizer state; only truncating calls change it


def add_encoder_routes(app: FastAPI, state: ServerState, guard, default_route: str | None = None) -> None:
    """Register the encoder routes (a generation engine answers them with a 400 naming the model)."""
    if hasattr(state.engine, "encode"):
        state.metrics.registry.register(EncoderStatsCollector(state.engine))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await guard(state, create_embeddings, request)

    @app.post("/rerank")
    async def rerank(request: Request):
        return await guard(state, create_rerank, request)

    predict_handler = {"/v1/embeddings": create_embeddings, "/rerank": create_rerank}.get(default_route, create_predict)

    @app.post("/predict")
    async def predict(request: Request):
        return await guard(state, predict_handler, request)


def _encoder(state: ServerState, task: str, route: str):
    engine = state.engine
    kind = getattr(engine, "task", None)
    if kind is None:
        raise InvalidRequestError(f"{engine.served_model_name} is a generation model; {route} needs an encoder config "
                                  "(trt_llm.build.base_model: encoder or encoder_bert).", param="model")
    if kind != task:
        serves = "/v1/embeddings" if kind == "embed" else "/predict and /rerank"
        raise InvalidRequestError(f"{engine.served_model_name} serves {serves}, not {route}.", param="model")
    return engine


# ---- tokenization ----

def _tokenize(state: ServerState, texts: list[str], pairs: list[str] | None, req, param: str) -> list[EncoderInput]:
    """Texts (and their pairs) -> inputs within the model's limit; longer ones are cut if `req.truncate`, else a 400."""
    tok, limit = state.tokenizer, state.max_model_len
    if any(not t for t in texts):
        raise InvalidRequestError(f"'{param}' holds an empty string; every input needs text.", param=param)
    enc = tok(texts, pairs) if pairs is not None else tok(texts)
    too_long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > limit]
    if too_long and not req.truncate:
        i = too_long[0]
        raise ContextLengthExceededError(
            f"Input {i} of '{param}' has {len(enc['input_ids'][i])} tokens, above this model's limit of {limit} tokens; "
            "shorten it or send \"truncate\": true.", param=param)
    if too_long:
        with _TRUNCATE_LOCK:
            side = tok.truncation_side
            tok.truncation_side = "left" if req.cuts_left else "right"
            try:
                sub = [texts[i] for i in too_long]
                cut = tok(sub, [pairs[i] for i in too_long], truncation=True, max_length=limit) if pairs is not None \
                    else tok(sub, truncation=True, max_length=limit)
            finally:
                tok.truncation_side = side
        for k in enc:
            for j, i in enumerate(too_long):
                enc[k][i] = cut[k][j]
    types = enc.get("token_type_ids")
    return [EncoderInput(list(ids), list(types[i]) if types is not None and any(types[i]) else None)
            for i, ids in enumerate(enc["input_ids"])]


async def _tokenize_off_loop(state, texts, pairs, req, param) -> list[EncoderInput]:
    if sum(len(t) for t in texts) + sum(len(t) for t in pairs or []) < 20_000:
        return _tokenize(state, texts, pairs, req, param)
    return await anyio.to_thread.run_sync(_tokenize, state, texts, pairs, req, param)


def _token_inputs(state: ServerState, seqs: list[list[int]], req) -> list[EncoderInput]:
    limit = state.max_model_len
    out = []
    for i, ids in enumerate(seqs):
        if not ids:
            raise InvalidRequestError(f"Input {i} of 'input' is an empty token list.", param="input")
        bad = next((t for t in ids if t >= state.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"Token id {bad} in 'input' is out of range; the vocabulary has {state.vocab_size} tokens.", param="input")
        if len(ids) > limit:
            if not req.truncate:
                raise ContextLengthExceededError(
                    f"Input {i} of 'input' has {len(ids)} tokens, above this model's limit of {limit} tokens; "
                    "shorten it or send \"truncate\": true.", param="input")
            ids = ids[-limit:] if req.cuts_left else ids[:limit]
        out.append(EncoderInput(list(ids)))
    return out


async def _encode(state: ServerState, request: Request, engine, items: list[EncoderInput]) -> torch.Tensor:
    return await run_until_disconnect(engine.encode(items), request.receive)


# ---- /v1/embeddings ----

async def create_embeddings(state: ServerState, request: Request) -> JSONResponse:
    req: EmbeddingRequest = await parse_body(EmbeddingRequest, request)
    engine = _encoder(state, "embed", "/v1/embeddings")
    resolve_lora(req.model, engine, state.settings.strict_model_name)
    inp = req.input
    if isinstance(inp, list) and not inp:
        raise InvalidRequestError("'input' is an empty list; send at least one input.", param="input")
    if isinstance(inp, list) and len(inp) > MAX_INPUTS:
        raise InvalidRequestError(f"'input' holds {len(inp)} inputs, above the limit of {MAX_INPUTS}.", param="input")
    if req.dimensions is not None and req.dimensions > engine.hidden_size:
        raise InvalidRequestError(f"'dimensions' is {req.dimensions}, above this model's {engine.hidden_size}.", param="dimensions")
    if isinstance(inp, str):
        items = await _tokenize_off_loop(state, [inp], None, req, "input")
    elif isinstance(inp[0], str):
        items = await _tokenize_off_loop(state, list(inp), None, req, "input")
    elif isinstance(inp[0], int):
        items = _token_inputs(state, [list(inp)], req)
    else:
        items = _token_inputs(state, [list(x) for x in inp], req)
    rows = await _encode(state, request, engine, items)  # [N, hidden] float32
    if req.dimensions is not None and req.dimensions < rows.shape[1]:  # Matryoshka: keep the leading dims
        rows = rows[:, : req.dimensions]
        if engine.pooling.normalize:
            rows = torch.nn.functional.normalize(rows, p=2, dim=-1)
    data = [EmbeddingData(index=i, embedding=_encode_row(row, req.encoding_format)) for i, row in enumerate(rows)]
    num_tokens = sum(len(x.token_ids) for x in items)
    body = EmbeddingResponse(data=data, model=engine.served_model_name,
                             usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))
    return JSONResponse(body.model_dump(mode="json"))


def _encode_row(row: torch.Tensor, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(row.contiguous().numpy().astype("<f4").tobytes()).decode("ascii")
    return row.tolist()


# ---- /rerank and /predict ----

async def create_rerank(state: ServerState, request: Request) -> JSONResponse:
    req: RerankRequest = await parse_body(RerankRequest, request)
    engine = _encoder(state, "classify", "/rerank")
    resolve_lora(req.model, engine, state.settings.strict_model_name)
    if engine.spec.num_labels != 1:
        raise InvalidRequestError(f"{engine.served_model_name} has {engine.spec.num_labels} labels; /rerank needs a "
                                  "cross-encoder with one (use /predict).", param="model")
    if not req.query:
        raise InvalidRequestError("'query' is empty.", param="query")
    items = await _tokenize_off_loop(state, [req.query] * len(req.texts), list(req.texts), req, "texts")
    logits = (await _encode(state, request, engine, items))[:, 0]  # [N]
    scores = logits if req.raw_scores else torch.sigmoid(logits)
    results = [RerankResult(index=i, score=float(s), text=req.texts[i] if req.return_text else None)
               for i, s in enumerate(scores)]
    results.sort(key=lambda r: -r.score)
    return JSONResponse([r.model_dump(mode="json", exclude_none=True) for r in results])


async def create_predict(state: ServerState, request: Request) -> JSONResponse:
    req: PredictRequest = await parse_body(PredictRequest, request)
    engine = _encoder(state, "classify", "/predict")
    resolve_lora(req.model, engine, state.settings.strict_model_name)
    is_single = isinstance(req.inputs, str)
    inputs = [req.inputs] if is_single else req.inputs
    if not inputs:
        raise InvalidRequestError("'inputs' is an empty list.", param="inputs")
    firsts = [x if isinstance(x, str) else x[0] for x in inputs]
    seconds = [None if isinstance(x, str) or len(x) == 1 else x[1] for x in inputs]
    if any(s is not None for s in seconds) and any(s is None for s in seconds):
        raise InvalidRequestError("'inputs' mixes single texts and pairs; send one kind per request.", param="inputs")
    items = await _tokenize_off_loop(state, firsts, seconds if seconds[0] is not None else None, req, "inputs")
    logits = await _encode(state, request, engine, items)  # [N, num_labels]
    if req.raw_scores:
        scores = logits
    else:
        scores = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=-1)
    labels = engine.spec.labels
    out = []
    for row in scores:
        preds = sorted((Prediction(label=labels[j], score=float(s)) for j, s in enumerate(row)), key=lambda p: -p.score)
        out.append([p.model_dump(mode="json") for p in preds])
    return JSONResponse(out[0] if is_single else out)


class EncoderStatsCollector:
    """/metrics for an encoder: embeddings and tokens per second (over the engine's window) and their totals."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        try:
            s = self.engine.stats()
        except Exception:  # noqa: BLE001 - a scrape never fails because the engine did
            return
        for name, doc, value in (("ember_embeddings_per_second", "Inputs encoded per second (recent window).", s.embeddings_per_second),
                                 ("ember_encoder_tokens_per_second", "Tokens encoded per second (recent window).", s.tokens_per_second)):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        c = CounterMetricFamily("ember_embeddings", "Inputs encoded (embedded or classified) since start.")
        c.add_metric([], float(s.embeddings_total))
        yield c
