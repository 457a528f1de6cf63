"""`LLM(CONFIG)` / `ember serve CONFIG` with a quantization_type: the engine is built once into the engine cache,
reused by the next start, rebuilt when the build section or the checkpoint changes, and generates exactly what
`ember build` then serving the engine directory generates."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml

from ember import LLM, SamplingParams
from ember.build.engine_cache import engine_key, resolve_engine
from ember.config import load_config

from build_support import build_config, write_tiny

PROMPTS = ["def add(a, b):", "The quick brown fox"]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("cache-ckpt") / "tiny-llama")


def _config(ckpt: Path, cache: Path, qtype: str = "int8", **quant) -> dict:
    data = build_config(ckpt, qtype, **quant)
    data["ember"]["engine_cache_dir"] = str(cache)
    data["ember"]["kv_cache_memory_bytes"] = 1 << 22
    return data


def _greedy(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_llm_config_builds_once_then_reuses_and_matches_build(ckpt, tmp_path, caplog):
    from ember.build.builder import build_engine

    cache = tmp_path / "cache"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(ckpt, cache)))
    caplog.set_level(logging.INFO, logger="ember")

    first = LLM(str(config))
    log = _messages(caplog)
    assert "engine cache: building a int8 engine" in log and "reusing" not in log
    assert "int8 weights" in log  # the startup line names the quantization and the weight size
    (engine,) = [p for p in cache.iterdir() if p.is_dir()]
    assert first.config.trt_llm.build.checkpoint_repository.repo == str(engine)
    assert first.config.served_model_id == "tiny"
    # int8 Linears: the resident weights are the stored int8 ones
    linear = first.engine.runner.model.model.layers[0].mlp.down_proj
    assert linear.weight.dtype.is_floating_point is False and linear.weight.element_size() == 1
    cached_tokens = _greedy(first)
    first.engine.shutdown()

    caplog.clear()
    second = LLM(str(config))
    log = _messages(caplog)
    assert f"engine cache: reusing the int8 engine {engine}" in log and "building" not in log
    assert _greedy(second) == cached_tokens
    second.engine.shutdown()

    # `ember build` then serving the engine directory: the same tokens
    explicit = build_engine(load_config(_config(ckpt, cache)), tmp_path / "explicit", num_eval_prompts=1,
                            eval_max_seq_length=32, progress=False, log=lambda *_: None)
    direct = LLM(str(explicit), dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 22)
    assert _greedy(direct) == cached_tokens
    direct.engine.shutdown()


def test_serve_config_serves_the_cached_engine(ckpt, tmp_path, monkeypatch):
    """`ember serve CONFIG` hands the engine core the cached engine's config (the one LLM(CONFIG) serves)."""
    import ember.engine.async_engine as async_engine
    from ember.server.app import build_engine

    cfg = load_config(_config(ckpt, tmp_path / "cache"))
    served = resolve_engine(cfg, log=lambda *_: None)
    seen = []
    monkeypatch.setattr(async_engine, "AsyncLLM", lambda c: seen.append(c) or c)
    build_engine(cfg)
    assert seen[0].trt_llm.build.checkpoint_repository == served.trt_llm.build.checkpoint_repository
    assert seen[0].served_model_id == cfg.served_model_id == "tiny"
    assert Path(served.trt_llm.build.checkpoint_repository.repo).parent == tmp_path / "cache"


def test_key_covers_what_changes_the_artifact(tmp_path):
    ckpt = write_tiny(tmp_path / "tiny")
    cache = tmp_path / "cache"

    def key(data) -> str:
        return engine_key(load_config(data), ckpt, "cpu", "float32")[0]

    base = key(_config(ckpt, cache))
    unrelated = _config(ckpt, cache)
    unrelated["trt_llm"]["build"]["max_batch_size"] = 3
    unrelated["ember"]["port"] = 1234
    assert key(unrelated) == base  # served at start-up, not built
    assert key(_config(ckpt, cache, "fp8")) != base
    assert key(_config(ckpt, cache, calib_size=2)) != base
    assert engine_key(load_config(_config(ckpt, cache)), ckpt, "cpu", "bfloat16")[0] != base
    weights = ckpt / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the checkpoint rewritten
    assert key(_config(ckpt, cache)) != base


def test_changed_checkpoint_or_damaged_engine_rebuilds(tmp_path):
    ckpt = write_tiny(tmp_path / "tiny")
    cfg = load_config(_config(ckpt, tmp_path / "cache"))
    logs: list[str] = []
    first = Path(resolve_engine(cfg, log=logs.append).trt_llm.build.checkpoint_repository.repo)
    assert Path(resolve_engine(cfg, log=logs.append).trt_llm.build.checkpoint_repository.repo) == first
    assert [m.split(" ")[2] for m in logs if m.startswith("engine cache:")] == ["building", "reusing"]

    # a killed build leaves only its temporary directory; a damaged engine is not reused
    (first.parent / f".{first.name}.building").mkdir()
    weights = first / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    logs.clear()
    assert Path(resolve_engine(cfg, log=logs.append).trt_llm.build.checkpoint_repository.repo) == first
    assert any(m.startswith("engine cache: building") for m in logs)
    assert not (first.parent / f".{first.name}.building").exists()

    st = (ckpt / "config.json").stat()
    os.utime(ckpt / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    logs.clear()
    second = Path(resolve_engine(cfg, log=logs.append).trt_llm.build.checkpoint_repository.repo)
    assert second != first and any(m.startswith("engine cache: building") for m in logs)


def test_no_quant_needs_no_build(tmp_path):
    cfg = load_config(_config(tmp_path, tmp_path / "cache", "no_quant"))
    assert resolve_engine(cfg) is cfg and not (tmp_path / "cache").exists()
