"""Multi-LoRA through the real HTTP server and the official openai client: adapters chosen by `model`,
listed by /v1/models, unknown names a 404 in OpenAI's shape, run-time load/unload confined and behind the key."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest
import torch

from ember.config import load_config
from ember.engine.async_engine import AsyncLLM
from ember.server.app import create_app
from live_server import LiveServer, running

from .conftest import lora_config, merged_reference

API_KEY = "lora-key"


@pytest.fixture(scope="module")
def server(lora_models, tmp_path_factory):
    base, adapters = lora_models["llama"]
    runtime_root = tmp_path_factory.mktemp("runtime_adapters")
    shutil.copytree(adapters["qv-r8"], runtime_root / "late")
    cfg = load_config(lora_config(base, adapters, api_key=API_KEY, lora_runtime_dir=str(runtime_root),
                                 strict_model_name=True))  # strict: a name that is no adapter is a 404, not the base model
    engine = AsyncLLM(cfg)
    with running(LiveServer(create_app(engine, cfg), stop_timeout_s=30.0)) as live:
        yield live.url, engine, base, adapters


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _reference_text(engine, base, adapter_dir, prompt_ids, n):
    model = merged_reference(base, adapter_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.int64),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return engine.tokenizer.decode(out[0, len(prompt_ids):].tolist(), skip_special_tokens=True)


def test_models_lists_base_and_adapters(server):
    url, *_ = server
    ids = [m.id for m in _client(url).models.list().data]
    assert ids[0] == "tiny" and set(ids[1:]) == {"all-r4", "qv-r8", "mlp-r2-rs"}


def test_completions_select_adapter_by_model(server):
    url, engine, base, adapters = server
    client = _client(url)
    prompt = [100, 2000, 3000, 4000, 5000, 6000]
    texts = {}
    for name in ("tiny", "all-r4", "qv-r8"):
        resp = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0.0,
                                         extra_body={"ignore_eos": True})
        texts[name] = resp.choices[0].text
        assert resp.model == name
        ref = _reference_text(engine, base, adapters.get(name), prompt, 6)
        assert texts[name] == ref, name
    assert texts["all-r4"] != texts["tiny"]  # the adapter really changes the output


def test_unknown_model_is_404(server):
    url, *_ = server
    with pytest.raises(openai.NotFoundError) as exc:
        _client(url).chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.code == "model_not_found"


def test_runtime_load_and_unload(server):
    url, engine, base, adapters = server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "late"}).status_code == 401
        bad = http.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "../.."}, headers=headers)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
        ok = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "late"}, headers=headers)
        assert ok.status_code == 200, ok.text
    client = _client(url)
    assert "late" in [m.id for m in client.models.list().data]
    prompt = [1200, 3400, 5600, 7800, 9000]
    resp = client.completions.create(model="late", prompt=prompt, max_tokens=5, temperature=0.0,
                                     extra_body={"ignore_eos": True})
    assert resp.choices[0].text == _reference_text(engine, base, adapters["qv-r8"], prompt, 5)
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}, headers=headers).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt=prompt, max_tokens=2)
