"""/openapi.json describes every route's bodies, and the server keeps to it under fuzzing (schemathesis).

The fuzzed server is real: a tiny random Llama in an in-process engine, served by uvicorn, with its token budget
capped (request_default_max_tokens 4, max_tokens_limit 8, n <= 2) so generated requests stay cheap. Each
operation gets a fixed number of generated cases, derandomized (the same cases every run). Checks: no 5xx, and
every response's status, content type and body conform to what the document declares for it.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, \
    status_code_conformance

from live_server import LiveServer, running

CASES_PER_OPERATION = 12


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama_dir):
    from ember.config import load_config
    from ember.engine.async_engine import AsyncLLM
    from ember.engine.llm_engine import LLMEngine
    from ember.server.app import create_app

    cfg = load_config(str(tiny_llama_dir), dtype="float32", max_seq_len=256, request_default_max_tokens=4,
                      max_tokens_limit=8, max_n=2, kv_cache_memory_bytes=64 << 20)
    app = create_app(AsyncLLM(engine=LLMEngine(cfg)), cfg)
    with running(LiveServer(app)) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def test_every_route_declares_its_bodies(api_schema):
    doc = api_schema.raw_schema
    components = doc["components"]["schemas"]
    assert {"ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionChunk", "CompletionRequest",
            "ErrorResponse", "ModelList"} <= set(components)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "post":
                body = op["requestBody"]["content"]["application/json"]["schema"]
                assert body.get("$ref") or body.get("type") == "object", (path, body)
            ok = op["responses"]["200"]["content"]
            assert ok and all(media["schema"] for media in ok.values()), (path, ok)
            error = op["responses"]["default"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionResponse"}
    assert "text/event-stream" in chat


def test_fuzzed_requests_conform(api_schema):
    """Each operation's generated cases (valid and invalid bodies, paths and queries) sent to the real server.
    (Hypothesis driven directly: schemathesis' pytest plugin does not load under pytest 9.)"""
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @settings(max_examples=CASES_PER_OPERATION, derandomize=True, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            case.call_and_validate(checks=checks, timeout=60)

        fuzz()
