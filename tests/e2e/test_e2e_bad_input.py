"""Bad input against the real server: every case gets a 4xx in OpenAI's error shape
({"error": {"message", "type", "param", "code"}}), never a 500, and the server still serves a
normal request afterwards with every KV block back."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from e2e_server import API_KEY, real_server, wait_until

MAX_BODY = 64 * 1024
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields) -> dict:
    return {"messages": MSGS, "max_tokens": 4, **fields}


def comp(**fields) -> dict:
    return {"prompt": "hi", "max_tokens": 4, **fields}


# (case id, path, body: dict (sent as JSON) or bytes (sent as is), expected status, expected param, expected code)
# param/code None: not checked (the shape still is).
CASES = [
    ("malformed-json", CHAT, b'{"messages": [', 400, None, "invalid_json"),
    ("json-not-object", CHAT, b"[1, 2, 3]", 400, None, None),
    ("empty-body", CHAT, b"", 400, None, "invalid_json"),
    ("bad-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe\xfa"}]}', 400, None, None),
    ("deeply-nested-json", CHAT, b'{"messages": ' + b"[" * 20000 + b"]" * 20000 + b"}", 400, None, None),
    ("missing-messages", CHAT, {"max_tokens": 4}, 400, "messages", "missing_required_parameter"),
    ("empty-messages", CHAT, chat(messages=[]), 400, "messages", None),
    ("messages-not-list", CHAT, chat(messages="hi"), 400, "messages", None),
    ("invalid-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role", None),
    ("content-wrong-type", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, None, None),
    ("image-content-part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, None, None),
    ("unknown-model", CHAT, chat(model="gpt-17"), 404, "model", "model_not_found"),
    ("model-wrong-type", CHAT, chat(model=123), 400, "model", None),
    ("temperature-negative", CHAT, chat(temperature=-1), 400, "temperature", None),
    ("temperature-huge", CHAT, chat(temperature=1e9), 400, "temperature", None),
    ("temperature-string", CHAT, chat(temperature="hot"), 400, "temperature", None),
    ("temperature-nan", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None, None),
    ("top-p-above-one", COMP, comp(top_p=1.5), 400, "top_p", None),
    ("top-k-negative", COMP, comp(top_k=-5), 400, "top_k", None),
    ("min-p-above-one", COMP, comp(min_p=2), 400, "min_p", None),
    ("presence-penalty-huge", CHAT, chat(presence_penalty=3), 400, "presence_penalty", None),
    ("frequency-penalty-negative", CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty", None),
    ("repetition-penalty-zero", COMP, comp(repetition_penalty=0), 400, "repetition_penalty", None),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-negative", COMP, comp(max_tokens=-5), 400, "max_tokens", None),
    ("max-tokens-string", COMP, comp(max_tokens="ten"), 400, "max_tokens", None),
    ("max-tokens-over-context", COMP, comp(max_tokens=10**6), 400, "max_tokens", "context_length_exceeded"),
    ("max-tokens-beyond-int64", COMP, comp(max_tokens=10**30), 400, "max_tokens", None),
    ("max-completion-tokens-zero", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens", None),
    ("min-tokens-above-max", COMP, comp(min_tokens=10, max_tokens=4), 400, "min_tokens", None),
    ("n-zero", CHAT, chat(n=0), 400, "n", None),
    ("n-huge", CHAT, chat(n=1000), 400, "n", None),
    ("n-string", COMP, comp(n="two"), 400, "n", None),
    ("seed-string", CHAT, chat(seed="abc"), 400, "seed", None),
    ("seed-beyond-int64", CHAT, chat(seed=2**70), 400, "seed", None),
    ("stop-wrong-type", CHAT, chat(stop=5), 400, "stop", None),
    ("stop-empty-string", COMP, comp(stop=[""]), 400, "stop", None),
    ("stop-too-many", COMP, comp(stop=[f"s{i}" for i in range(100)]), 400, "stop", None),
    ("stop-too-long", COMP, comp(stop="x" * 1000), 400, "stop", None),
    ("stop-token-ids-negative", COMP, comp(stop_token_ids=[-1]), 400, None, None),
    ("logprobs-not-bool", CHAT, chat(logprobs="maybe"), 400, "logprobs", None),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs", None),
    ("top-logprobs-huge", CHAT, chat(logprobs=True, top_logprobs=500), 400, "top_logprobs", None),
    ("completion-logprobs-negative", COMP, comp(logprobs=-1), 400, "logprobs", None),
    ("completion-logprobs-huge", COMP, comp(logprobs=100), 400, "logprobs", None),
    ("stream-not-bool", CHAT, chat(stream="often"), 400, "stream", None),
    ("stream-options-wrong-type", CHAT, chat(stream=True, stream_options="usage"), 400, "stream_options", None),
    ("response-format-unknown-type", CHAT, chat(response_format={"type": "xml"}), 400, None, None),
    ("empty-prompt-list", COMP, comp(prompt=[]), 400, "prompt", None),
    ("empty-prompt-string", COMP, comp(prompt=""), 400, "prompt", None),
    ("prompt-wrong-type", COMP, comp(prompt={"text": "hi"}), 400, "prompt", None),
    ("token-id-out-of-vocab", COMP, comp(prompt=[1, 2, 10**6]), 400, "prompt", None),
    ("token-id-negative", COMP, comp(prompt=[1, -3]), 400, "prompt", None),
    ("overlong-prompt", COMP, comp(prompt="hello " * 1100), 400, "prompt", "context_length_exceeded"),
    ("overlong-chat", CHAT, chat(messages=[{"role": "user", "content": "hello " * 1100}], max_tokens=None), 400, "messages",
     "context_length_exceeded"),
    ("too-many-prompts", COMP, comp(prompt=["a"] * 100), 400, "prompt", None),
    ("body-too-large", CHAT, chat(messages=[{"role": "user", "content": "x" * (2 * MAX_BODY)}]), 413, None, "request_too_large"),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [10**7]}, 400, "tokens", None),
    ("tokenize-both-prompt-and-messages", "/tokenize", {"prompt": "a", "messages": MSGS}, 400, "prompt", None),
]


@pytest.fixture(scope="module")
def server():
    with real_server(api_key=API_KEY, max_body_bytes=MAX_BODY, strict_model_name=True) as s:  # strict: unknown models are 404s
        yield s


def check_error_shape(resp, status: int, param=None, code=None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_bad_inputs_get_openai_shaped_4xx(server):
    assert len(CASES) >= 30
    failures = []
    with server.client() as http:
        for case_id, path, body, status, param, code in CASES:
            headers = {"Content-Type": "application/json"}
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                check_error_shape(http.post(path, content=content, headers=headers), status, param, code)
            except (AssertionError, httpx.HTTPError) as exc:
                failures.append(f"{case_id}: {exc}")
            try:  # the same body streamed: refused before any stream starts
                if isinstance(body, dict) and path in (CHAT, COMP) and status != 413 and "stream" not in body:
                    check_error_shape(http.post(path, json={**body, "stream": True}), status, param, code)
            except (AssertionError, httpx.HTTPError) as exc:
                failures.append(f"{case_id} (stream): {exc}")
    assert not failures, "\n".join(failures)


def raw_post(server, content_length: str, body: bytes) -> httpx.Response:
    """A POST with a Content-Length header httpx would refuse to send; the response read off the socket."""
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {content_length}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head_bytes, payload = data.split(b"\r\n\r\n", 1)
    status = int(head_bytes.split()[1])
    return httpx.Response(status, content=payload)


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62


def test_bad_requests_outside_the_body(server):
    with server.client() as http:
        check_error_shape(http.post(CHAT, json=chat(), headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
        with server.client() as anon:
            anon.headers.pop("Authorization")
            check_error_shape(anon.post(CHAT, json=chat()), 401, code="invalid_api_key")
        err = check_error_shape(http.post(CHAT, json=chat(), headers={"Request-Timeout-Ms": "soon"}), 400)
        assert err["param"].lower() == "request-timeout-ms"
        # (a malformed Content-Length never reaches the app: uvicorn's HTTP parser answers a plain-text 400)
        assert raw_post(server, "abc", b"{}").status_code == 400
        # a declared length far over the bound: refused from the headers alone, the body never sent
        check_error_shape(raw_post(server, str(10**10), b'{"messages": '), 413, code="request_too_large")
        check_error_shape(http.get(CHAT), 405)
        check_error_shape(http.post("/v1/no-such-route", json={}), 404)
        check_error_shape(http.get("/v1/models/gpt-17"), 404, code="model_not_found")
        # a declared Content-Length over the bound is refused before the body is read
        check_error_shape(http.post(CHAT, content=b"{" + b" " * (MAX_BODY + 10) + b"}"), 413, code="request_too_large")


def test_server_still_serves(server):
    """Runs after the bad inputs (file order): no 500 was counted, and a normal request works."""
    with server.client() as http:
        resp = http.post(CHAT, json=chat(max_tokens=5, temperature=0))
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"]
        resp = http.post(COMP, json=comp(max_tokens=5, stream=True))
        assert resp.status_code == 200 and resp.text.rstrip().endswith("data: [DONE]")
        metrics = http.get("/metrics").text
    assert 'status="500"' not in metrics
    assert server.engine.is_healthy()
    assert wait_until(server.is_idle), "requests or KV blocks left over"
