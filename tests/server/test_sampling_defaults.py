"""The model's sampling defaults (generation_config.json, GGUF general.sampling.*, ember.sampling_defaults) fill
the sampling fields a request leaves out or sends as null; a field the request sets always wins."""

from __future__ import annotations

import json
import shutil

import pytest

from ember.checkpoint import load_checkpoint
from ember.checkpoint.sampling_defaults import from_generation_config, from_gguf_metadata
from ember.server.app import create_app
from server_support import asgi_client, make_cfg

pytestmark = pytest.mark.anyio
MSGS = [{"role": "user", "content": "Hi"}]
DEFAULTS = {"temperature": 0.25, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}


def test_readers_keep_only_sampling_fields():
    gen = {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "do_sample": True, "eos_token_id": [2, 3],
           "repetition_penalty": 1.05, "max_new_tokens": 100}
    assert from_generation_config(gen) == {"temperature": 0.6, "top_p": 0.95, "top_k": -1, "repetition_penalty": 1.05}
    meta = {"general.sampling.temp": 0.7, "general.sampling.top_k": 40, "general.sampling.penalty_repeat": 1.1,
            "general.name": "x"}
    assert from_gguf_metadata(meta) == {"temperature": 0.7, "top_k": 40, "repetition_penalty": 1.1}


async def test_left_out_or_null_fields_take_the_model_defaults(engine):
    engine.sampling_defaults = dict(DEFAULTS)
    async with asgi_client(create_app(engine, make_cfg())) as client:
        r = await client.post("/v1/chat/completions", json={"model": "m", "messages": MSGS})
        assert r.status_code == 200, r.text
        p = engine.calls[-1].params
        assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.min_p) == (0.25, 0.8, 20, 1.1, 0.0)
        r = await client.post("/v1/chat/completions", json={"model": "m", "messages": MSGS, "temperature": None,
                                                             "top_p": 0.5, "top_k": -1, "repetition_penalty": None})
        assert r.status_code == 200, r.text
        p = engine.calls[-1].params
        assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.25, 0.5, -1, 1.1)
        r = await client.post("/v1/completions", json={"model": "m", "prompt": "Hi", "temperature": 1.5, "max_tokens": 3})
        assert r.status_code == 200, r.text
        p = engine.calls[-1].params
        assert (p.temperature, p.top_p, p.top_k) == (1.5, 0.8, 20)


async def test_without_model_defaults_openai_defaults_apply(engine):
    async with asgi_client(create_app(engine, make_cfg())) as client:
        r = await client.post("/v1/chat/completions", json={"model": "m", "messages": MSGS, "top_p": None})
        assert r.status_code == 200, r.text
    p = engine.calls[-1].params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (1.0, 1.0, -1, 0.0, 1.0)


def test_checkpoint_defaults_under_the_config(tiny_llama_dir, tmp_path):
    """generation_config.json -> Checkpoint -> the engine core's info -> AsyncLLM, with ember.sampling_defaults over it."""
    from ember.config import load_config
    from ember.engine.async_engine import AsyncLLM
    from ember.engine.llm_engine import LLMEngine

    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, ckpt_dir)
    (ckpt_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}))
    assert load_checkpoint(ckpt_dir).sampling_defaults == {"temperature": 0.6, "top_p": 0.9}
    cfg = load_config(str(ckpt_dir), dtype="float32", sampling_defaults={"temperature": 0.0, "top_k": 5})
    llm = AsyncLLM(engine=LLMEngine(cfg))
    assert llm.sampling_defaults == {"temperature": 0.0, "top_p": 0.9, "top_k": 5}


def test_config_rejects_out_of_range_defaults(tiny_llama_dir):
    from ember.config import load_config

    with pytest.raises(Exception, match="temperature"):
        load_config(str(tiny_llama_dir), sampling_defaults={"temperature": 3.0})
