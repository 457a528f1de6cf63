"""ember.config: Baseten Engine-Builder-LLM configs load unchanged; bad ones fail with one line naming the
field; overrides land at their dotted path; defaults are sane. Pure Python, milliseconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ember.config import EngineConfig, SpeculatorConfig, load_config, parse_config
from ember.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent / "configs").glob("*.yaml"))


def _build(**kw):
    return {"trt_llm": {"build": kw}}


def _error(data) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(data)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_configs_load(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    out = cfg.normalized_dict()
    # every key the file sets comes back with the value it set (Truss keys kept as they were)
    for key, value in raw.items():
        if key not in ("trt_llm", "ember", "resources"):
            assert out[key] == value
    for key, value in (raw["trt_llm"].get("runtime") or {}).items():
        assert out["trt_llm"]["runtime"][key] == value
    assert cfg.trt_llm.build.base_model == "decoder"
    assert yaml.safe_load(yaml.safe_dump(out)) == out  # printable by `ember check`
    assert parse_config(out) == cfg  # the normalized form is a fixed point


def test_example_details():
    by_name = {p.stem: load_config(p) for p in CONFIGS}
    llama = by_name["llama-70b-fp8kv-tp4"].trt_llm.build
    assert (llama.quantization_type, llama.tensor_parallel_count, llama.max_seq_len) == ("fp8_kv", 4, 131072)
    assert llama.plugin_configuration.use_fp8_context_fmha and llama.plugin_configuration.paged_kv_cache

    spec = by_name["qwen-coder-lookahead"].trt_llm.build.speculator
    assert spec.max_draft_len == 41 == SpeculatorConfig.lookahead_draft_len(3, 8, 3)
    assert by_name["qwen-coder-lookahead"].trt_llm.runtime.batch_scheduler_policy == "max_utilization"

    lora = by_name["mistral-multi-lora"]
    assert set(lora.trt_llm.build.lora_adapters) == {"support", "sql"}
    assert lora.trt_llm.build.lora_configuration.max_lora_rank == 16
    assert lora.served_model_id == "mistral"
    assert by_name["lora-older-docs"].trt_llm.build.lora_configuration.max_lora_rank == 32

    short = by_name["lookahead-short-names"].trt_llm.build.speculator
    assert (short.lookahead_windows_size, short.lookahead_ngram_size, short.lookahead_verification_set_size) == (3, 5, 3)

    b10 = by_name["baseten-lookahead-shorthand"].trt_llm.build.speculator
    assert b10.speculative_decoding_mode == "LOOKAHEAD_DECODING" and b10.enable_b10_lookahead
    assert (b10.lookahead_windows_size, b10.lookahead_ngram_size, b10.lookahead_verification_set_size) == (1, 32, 1)

    cpu = by_name["ember-cpu"]
    assert cpu.ember.kv_cache_memory_bytes == 512 * 2**20 and cpu.ember.limits.max_n == 4
    assert cpu.trt_llm.build.checkpoint_repository is None  # the default model


def test_defaults_are_sane():
    cfg = load_config()
    build, rt, em = cfg.trt_llm.build, cfg.trt_llm.runtime, cfg.ember
    assert build.checkpoint_repository is None and build.quantization_type == "no_quant"
    assert (build.max_batch_size, build.max_num_tokens, build.max_seq_len) == (256, 8192, None)
    assert rt.kv_cache_free_gpu_mem_fraction == 0.9 and rt.enable_chunked_context
    assert rt.batch_scheduler_policy == "guaranteed_no_evict"
    assert (em.dtype, em.device, em.host, em.port, em.api_key) == ("auto", "auto", "127.0.0.1", 8000, None)
    assert em.kv_cache_memory_bytes == 2**30 and em.block_size == 16 and em.enable_prefix_caching
    assert em.limits.max_logprobs == 20 and not em.trust_request_chat_template
    assert cfg == EngineConfig()


BAD = [
    (_build(quantization_type="fp7"), "trt_llm.build.quantization_type: 'fp7' is not one of no_quant, fp8"),
    (_build(quantization_type="smooth_quant"), "trt_llm.build.quantization_type: 'smooth_quant' is not supported"),
    (_build(max_seq_len=-5), "trt_llm.build.max_seq_len: -5 is too small; it must be >= 1"),
    (_build(max_seq_len="4096"), "trt_llm.build.max_seq_len: '4096' is not an integer"),
    (_build(max_batch_size=True), "trt_llm.build.max_batch_size: True is not an integer"),
    (_build(max_seq_length=4096), "trt_llm.build.max_seq_length: unknown key 'max_seq_length'; did you mean 'max_seq_len'?"),
    (_build(pipeline_parallel_count=2), "trt_llm.build.pipeline_parallel_count: 2 is not supported"),
    (_build(moe_expert_parallel_option=2), "trt_llm.build.moe_expert_parallel_option: 2 is not supported: expert"),
    (_build(tensor_parallel_count=4, moe_expert_parallel_option=3),
     "trt_llm.build.moe_expert_parallel_option: 3 is not supported: expert parallelism splits the experts over the "
     "tensor-parallel ranks, so it must divide tensor_parallel_count (4)"),
    (_build(max_beam_width=4), "trt_llm.build.max_beam_width: 4 is not supported: beam search"),
    (_build(base_model="whisper"), "trt_llm.build.base_model: 'whisper' is not supported"),
    (_build(base_model="encoder", lora_adapters={"a": {"source": "LOCAL", "repo": "/tmp"}}),
     "trt_llm.build: lora_adapters is for generation; base_model encoder serves"),
    (_build(checkpoint_repository={"source": "S3", "repo": "s3://bucket/model"}),
     "trt_llm.build.checkpoint_repository.source: 'S3' is not supported here"),
    (_build(checkpoint_repository={"source": "FTP", "repo": "x"}),
     "trt_llm.build.checkpoint_repository.source: 'FTP' is not one of HF, LOCAL"),
    (_build(checkpoint_repository={"source": "LOCAL", "repo": "/no/such/dir"}),
     "trt_llm.build.checkpoint_repository.repo: '/no/such/dir' does not exist"),
    (_build(lora_adapters={"a": {"source": "GCS", "repo": "gs://x"}}),
     "trt_llm.build.lora_adapters.a.source: 'GCS' is not supported here"),
    (_build(lora_adapters={"a": {"repo": "x/y", "revison": "main"}}),
     "trt_llm.build.lora_adapters.a.revison: unknown key 'revison'; did you mean 'revision'?"),
    (_build(speculator={"speculative_decoding_mode": "DRAFT_TOKENS_EXTERNAL", "num_draft_tokens": 4}),
     "trt_llm.build.speculator.speculative_decoding_mode: 'DRAFT_TOKENS_EXTERNAL' is not supported"),
    (_build(speculator={"lookahead_windows_size": 3}), "trt_llm.build.speculator: LOOKAHEAD_DECODING needs"),
    ({"trt_llm": {"runtime": {"kv_cache_free_gpu_mem_fraction": 1.5}}},
     "trt_llm.runtime.kv_cache_free_gpu_mem_fraction: 1.5 is too large; it must be <= 1"),
    ({"trt_llm": {"runtime": {"batch_scheduler_policy": "fifo"}}},
     "trt_llm.runtime.batch_scheduler_policy: 'fifo' is not one of guaranteed_no_evict, max_utilization"),
    ({"trt_llm": {"inference_stack": "v2", "runtime": {"patch_kwargs": {}}}}, "trt_llm.inference_stack: 'v2' is not supported"),
    ({"trtllm": {}}, "trtllm: unknown top-level key 'trtllm'; did you mean 'trt_llm'?"),
    ({"trt_llm": 5}, "trt_llm: 5 is not a mapping"),
    ({"ember": {"dtype": "fp8"}}, "ember.dtype: 'fp8' is not one of auto, float32, bfloat16, float16"),
    ({"ember": {"device": "tpu"}}, "ember.device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ({"ember": {"prot": 80}}, "ember.prot: unknown key 'prot'; did you mean 'port'?"),
    ({"ember": {"port": 70000}}, "ember.port: 70000 is too large; it must be <= 65535"),
    ({"ember": {"block_size": 12}}, "ember.block_size: 12 is not allowed"),
    ({"ember": {"limits": {"max_n": 0}}}, "ember.limits.max_n: 0 is too small"),
    ({"ember": {"kv_cache_memory_bytes": "lots"}}, "ember.kv_cache_memory_bytes: 'lots' is not a size"),
]


@pytest.mark.parametrize("data,expected", BAD, ids=[e.split(":")[0] + str(i) for i, (_, e) in enumerate(BAD)])
def test_bad_configs_name_the_field(data, expected):
    assert _error(data).startswith(expected)


def test_yaml_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("trt_llm: [unclosed\n")
    assert "bad.yaml" in _error(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert "top level must be a mapping" in _error(tmp_path / "list.yaml")
    assert "no such file or directory" in _error(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == EngineConfig()


def test_overrides():
    cfg = load_config(Path(__file__).parent / "configs" / "llama-70b-fp8kv-tp4.yaml", dtype="float32", max_seq_len=512, kv_cache_memory_bytes=2**20,
                      served_model_name="m", max_n=2, port=0, host=None)
    assert cfg.ember.dtype == "float32" and cfg.trt_llm.build.max_seq_len == 512
    assert cfg.ember.kv_cache_memory_bytes == 2**20 and cfg.trt_llm.runtime.served_model_name == "m"
    assert cfg.ember.limits.max_n == 2 and cfg.ember.port == 0 and cfg.ember.host == "127.0.0.1"
    assert cfg.trt_llm.build.tensor_parallel_count == 4  # untouched fields keep the file's values
    assert load_config(cfg, moe_expert_parallel_option=2).trt_llm.build.moe_expert_parallel_option == 2
    assert load_config(cfg, dtype="bfloat16").ember.dtype == "bfloat16"  # an EngineConfig as source
    with pytest.raises(ConfigError, match="override 'max_seqlen' is not a config field; did you mean 'max_seq_len'"):
        load_config(None, max_seqlen=3)
    with pytest.raises(ConfigError, match="ember.dtype: 'fp7'"):
        load_config(None, dtype="fp7")


def test_model_sources(tmp_path):
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = load_config(model)
    repo = cfg.trt_llm.build.checkpoint_repository
    assert (repo.source, repo.repo, cfg.served_model_id) == ("LOCAL", str(model), "tiny-llama")

    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert load_config(gguf).trt_llm.build.checkpoint_repository.repo == str(gguf)

    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "manifest.json").write_text("{}")
    assert load_config(engine).trt_llm.build.checkpoint_repository.source == "LOCAL"

    # relative LOCAL paths resolve against the YAML's directory; a Truss dir is read through config.yaml
    truss = tmp_path / "truss"
    truss.mkdir()
    (truss / "config.yaml").write_text(
        "trt_llm:\n  build:\n    checkpoint_repository:\n      source: LOCAL\n      repo: ../tiny-llama\n")
    assert load_config(truss).trt_llm.build.checkpoint_repository.repo == str(model)
    assert load_config(truss / "config.yaml").trt_llm.build.checkpoint_repository.repo == str(model)

    (tmp_path / "nothing").mkdir()
    assert "is not a model directory" in _error(tmp_path / "nothing")


def test_config_is_frozen_and_secret_redacted():
    cfg = load_config(None, api_key="sk-secret")
    with pytest.raises(Exception):
        cfg.ember.port = 1
    assert cfg.normalized_dict()["ember"]["api_key"] == "***"
    assert cfg.normalized_dict(redact_secrets=False)["ember"]["api_key"] == "sk-secret"


def test_aliases_normalize():
    cfg = parse_config({"trt_llm": {"build": {"base_model": "llama", "quantization_type": "weights_int8"}},
                        "ember": {"dtype": "bf16"}})
    assert (cfg.trt_llm.build.base_model, cfg.trt_llm.build.quantization_type, cfg.ember.dtype) == \
        ("decoder", "int8", "bfloat16")


def test_config_module_reads_no_environment():
    source = "".join(p.read_text() for p in (Path(__file__).parents[1] / "ember" / "config").glob("*.py"))
    assert "os.environ" not in source and "getenv" not in source and "import torch" not in source
