"""SIGTERM to a real `ember serve` process (a tiny random Llama, its engine core in a process of its own):
during the drain new requests get 503 in OpenAI's shape, a stream that finishes within the drain time ends
normally, streams still running when ember.drain_timeout_s ends get an SSE error event in OpenAI's shape and
then `[DONE]` (the official client raises APIError), and the process exits 0 with no traceback in its log."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import httpx
import openai
import pytest

from e2e_server import wait_until
from ember.distributed.launch import free_port

DRAIN_S = 3
MAX_CONTEXT = 32768
# cannot finish during the test on any CPU: the tiny model would need thousands of tokens a second
LONG = {"max_tokens": MAX_CONTEXT - 64, "ignore_eos": True, "stream": True}
SHORT = {"max_tokens": 6, "ignore_eos": True, "stream": True}  # 5 tokens after its first: well within the drain


def _serve(checkpoint, tmp_path) -> tuple[subprocess.Popen, str, object]:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model_name: tiny\ntrt_llm:\n  build:\n    checkpoint_repository: {{source: LOCAL, repo: {checkpoint}}}\n"
                   f"ember: {{dtype: float32, device: cpu, drain_timeout_s: {DRAIN_S}, kv_cache_memory_bytes: 64MiB}}\n")
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:  # a file, not a pipe nobody reads while the server runs
        proc = subprocess.Popen([sys.executable, "-m", "ember.cli", "serve", str(cfg), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log


def _is_ready(proc: subprocess.Popen, url: str) -> bool:
    assert proc.poll() is None, "ember serve exited before it was ready"
    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _events(first: str, lines) -> list:
    return [data if data == "[DONE]" else json.loads(data)
            for data in (line[len("data: "):] for line in [first, *lines] if line.startswith("data: "))]


def test_sigterm_drains_then_ends_running_streams_with_an_error(tiny_llama_dir, tmp_path):
    checkpoint = tmp_path / "tiny"
    shutil.copytree(tiny_llama_dir, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "max_position_embeddings": MAX_CONTEXT}))
    proc, url, log = _serve(checkpoint, tmp_path)
    try:
        assert wait_until(lambda: _is_ready(proc, url), timeout=300), log.read_text()[-3000:]
        with (openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60) as sdk,
              httpx.Client(base_url=url, timeout=60) as client):
            chat = iter(sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell a story."}],
                                                    max_tokens=LONG["max_tokens"], stream=True, extra_body={"ignore_eos": True}))
            assert next(chat).choices[0].delta.role == "assistant"
            with (client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "Once upon a time", **LONG}) as long,
                  client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "Hello", **SHORT}) as short):
                long_lines, short_lines = long.iter_lines(), short.iter_lines()
                long_first = next(line for line in long_lines if line.startswith("data: "))
                short_first = next(line for line in short_lines if line.startswith("data: "))
                proc.send_signal(signal.SIGTERM)
                new = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
                assert new.status_code == 503, new.text  # the server still listens during the drain and says why
                assert new.json()["error"] == {"message": "The server is shutting down and accepts no new requests.",
                                               "type": "service_unavailable", "param": None, "code": "server_draining"}
                short_events = _events(short_first, short_lines)
                long_events = _events(long_first, long_lines)
            with pytest.raises(openai.APIError) as exc:
                for _ in chat:
                    pass
        returncode = proc.wait(timeout=DRAIN_S + 60)  # a bound on a hang, not a speed claim
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert f"drain time of {DRAIN_S} s is over: ending 2 running request(s)" in text, text[-3000:]
    # finished within the drain: all its tokens, its finish_reason, [DONE]
    assert short_events[-1] == "[DONE]" and short_events[-2]["choices"][0]["finish_reason"] == "length"
    assert all("error" not in e for e in short_events[:-1])
    # still running at the end of the drain: chunks, one error event in OpenAI's shape, [DONE]
    assert long_events[-1] == "[DONE]" and all("choices" in e for e in long_events[:-2])
    error = long_events[-2]["error"]
    assert error == {"message": f"The server is shutting down and this request did not finish within its drain time of {DRAIN_S} s "
                                "(ember.drain_timeout_s).", "type": "service_unavailable", "param": None, "code": "server_shutdown"}
    assert exc.value.body == error and exc.value.code == "server_shutdown"
