"""The encoder routes through a real server: the openai SDK's embeddings.create and the Performance Client's
embed / rerank / classify, unmodified, against `ember serve`'s app over a real EncoderEngine."""

import base64
import contextlib

import httpx
import numpy as np
import pytest
import torch

from ember.encoder.engine import EncoderEngine
from ember.server.app import create_app
from tests.encoder.conftest import encoder_config
from tests.encoder.test_encoder_models import PAIRS, TEXTS
from tests.live_server import LiveServer, running


@contextlib.contextmanager
def serve(path, **kw):
    cfg = encoder_config(path, **kw)
    with running(LiveServer(create_app(EncoderEngine(cfg), cfg))) as server:
        yield server


@pytest.fixture(scope="module")
def embed_server(bert_mean_dir):
    with serve(bert_mean_dir) as server:
        yield server


def _reference(path, texts):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)


def test_openai_embeddings(embed_server, bert_mean_dir):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=embed_server.url + "/v1", api_key="x", max_retries=0)
    ref = _reference(bert_mean_dir, TEXTS)
    got = client.embeddings.create(model="enc", input=TEXTS)  # the SDK asks for base64 and decodes it
    assert [d.index for d in got.data] == list(range(len(TEXTS)))
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), ref, atol=1e-4)
    assert got.usage.prompt_tokens == got.usage.total_tokens > len(TEXTS)
    one = client.embeddings.create(model="enc", input=TEXTS[0], encoding_format="float", dimensions=16)
    cut = ref[0, :16] / np.linalg.norm(ref[0, :16])  # Matryoshka: leading dims, renormalized
    np.testing.assert_allclose(one.data[0].embedding, cut, atol=1e-4)
    ids = embed_server_tokens(bert_mean_dir, TEXTS[2])
    by_ids = client.embeddings.create(model="enc", input=ids, encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, ref[2], atol=1e-4)
    long_text = " ".join(["fox"] * 200)
    with pytest.raises(BadRequestError) as e:
        client.embeddings.create(model="enc", input=long_text)
    assert e.value.body["code"] == "context_length_exceeded" and "limit of 64 tokens" in e.value.body["message"]
    cut_long = client.embeddings.create(model="enc", input=long_text, extra_body={"truncate": True})
    assert cut_long.usage.prompt_tokens == 64
    for bad, param in (({"input": []}, "input"), ({"input": [""]}, "input"), ({"input": "a", "dimensions": 65}, "dimensions"),
                       ({"input": "a", "encoding_format": "int8"}, "encoding_format"), ({"input": [10**6]}, "input")):
        r = httpx.post(embed_server.url + "/v1/embeddings", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    r = httpx.post(embed_server.url + "/rerank", json={"query": "a", "texts": ["b"]})
    assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]["message"]
    r = httpx.post(embed_server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "is an encoder" in r.json()["error"]["message"]
    metrics = httpx.get(embed_server.url + "/metrics").text
    assert "ember_embeddings_per_second" in metrics and "ember_encoder_tokens_per_second" in metrics
    assert "ember_embeddings_total" in metrics


def embed_server_tokens(path, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)(text)["input_ids"]


def test_performance_client_embed(embed_server, bert_mean_dir):
    from baseten_performance_client import PerformanceClient

    client = PerformanceClient(base_url=embed_server.url, api_key="x")
    got = client.embed(input=TEXTS, model="enc")
    np.testing.assert_allclose(got.numpy(), _reference(bert_mean_dir, TEXTS), atol=1e-4)
    raw = client.embed(input=TEXTS[:1], model="enc", encoding_format="base64").data[0].embedding
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(raw), dtype="<f4"), got.numpy()[0], atol=1e-6)


def _hf_logits(path, texts, pairs=None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.cat([model(**tok(t, p, return_tensors="pt") if p else tok(t, return_tensors="pt")).logits
                          for t, p in zip(texts, pairs or [None] * len(texts))])


def test_performance_client_rerank(bert_reranker_dir):
    from baseten_performance_client import PerformanceClient

    query, docs = PAIRS[0][0], [p[1] for p in PAIRS]
    ref = torch.sigmoid(_hf_logits(bert_reranker_dir, [query] * len(docs), docs)[:, 0])
    with serve(bert_reranker_dir) as server:
        got = PerformanceClient(base_url=server.url, api_key="x").rerank(query=query, texts=docs, return_text=True)
        raw = httpx.post(server.url + "/rerank", json={"query": query, "texts": docs, "raw_scores": True}).json()
        r = httpx.post(server.url + "/v1/embeddings", json={"input": "a"})
    order = sorted(range(len(docs)), key=lambda i: -ref[i])
    assert [x.index for x in got.data] == order
    assert [x.text for x in got.data] == [docs[i] for i in order]
    np.testing.assert_allclose([x.score for x in got.data], ref[order].numpy(), atol=1e-5)
    assert all("text" not in x for x in raw)
    np.testing.assert_allclose(sorted(x["score"] for x in raw), sorted(torch.logit(ref.double()).tolist()), atol=1e-4)
    assert r.status_code == 400 and "/predict and /rerank" in r.json()["error"]["message"]


def test_performance_client_classify(xlmr_classifier_dir):
    from baseten_performance_client import PerformanceClient

    ref = torch.softmax(_hf_logits(xlmr_classifier_dir, TEXTS), dim=-1)
    with serve(xlmr_classifier_dir) as server:
        got = PerformanceClient(base_url=server.url, api_key="x").classify(inputs=TEXTS)
        single = httpx.post(server.url + "/predict", json={"inputs": TEXTS[0], "raw_scores": True}).json()
        r = httpx.post(server.url + "/rerank", json={"query": "a", "texts": ["b"]})
    labels = ["negative", "neutral", "positive"]
    for row, ref_row in zip(got.data, ref):
        assert [x.label for x in row] == [labels[j] for j in torch.argsort(ref_row, descending=True)]
        np.testing.assert_allclose(sorted(x.score for x in row), sorted(ref_row.tolist()), atol=1e-5)
    assert isinstance(single, list) and {x["label"] for x in single} == set(labels)
    assert r.status_code == 400 and "3 labels" in r.json()["error"]["message"]


def test_default_route_sends_predict_to_embeddings(bert_mean_dir):
    from ember.config import load_config
    from ember.server.app import build_engine

    cfg = load_config({"trt_llm": {"build": {"base_model": "encoder_bert", "checkpoint_repository": {"source": "LOCAL", "repo": str(bert_mean_dir)}},
                                   "runtime": {"webserver_default_route": "/v1/embeddings"}},
                       "ember": {"dtype": "float32", "device": "cpu"}})
    engine = build_engine(cfg)  # what `ember serve` builds for an encoder config
    assert isinstance(engine, EncoderEngine)
    with running(LiveServer(create_app(engine, cfg))) as server:
        r = httpx.post(server.url + "/predict", json={"input": ["paris"]})
    assert r.status_code == 200 and r.json()["object"] == "list" and len(r.json()["data"][0]["embedding"]) == 64
