"""`ember build` on a tiny random Llama: every quantization type builds, loads through the normal engine path,
stays close to the unquantized model, is smaller by its format's factor; broken engines are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ember.build.calibration import BuildError, forward_logits, load_texts
from ember.build.engine_dir import EngineFormatError
from ember.checkpoint import load_checkpoint
from ember.layers.quant import QUANT_SCHEMES, make_quant_method

from build_support import build_config, write_tiny

# type -> (max relative logit error, min greedy agreement, max bytes of a quantized Linear per fp32 byte)
TOLERANCE = {
    "no_quant": (1e-6, 1.0, None),
    "int8": (0.03, 0.9, 0.26),
    "fp8": (0.08, 0.85, 0.26),
    "fp8_kv": (0.08, 0.85, 0.26),
    "int4": (0.25, 0.6, 0.15),
    "fp4": (0.3, 0.6, 0.15),
    "fp4_kv": (0.3, 0.6, 0.15),
    "fp4_mlp_only": (0.15, 0.7, 0.15),
}
TEXT = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog near the river bank."


def _model(path, dtype=torch.float32):
    from ember.models.registry import get_model_class

    ckpt = load_checkpoint(path)
    model = get_model_class(ckpt.architecture)(ckpt.hf_config, dtype=dtype, device="cpu")
    model.load_weights(ckpt.iter_weights())
    return model.eval(), ckpt


@pytest.mark.parametrize("qtype", list(TOLERANCE))
def test_each_type_builds_loads_and_stays_close(qtype, engines, tiny_llama):
    engine_dir = engines(qtype)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    ref, ref_ckpt = _model(tiny_llama)
    eng, ckpt = _model(engine_dir)
    assert ckpt.format == "engine" and ckpt.architecture == "LlamaForCausalLM"
    max_err, min_agree, max_ratio = TOLERANCE[qtype]

    # logits: the second half reads the first half's K/V from the cache (fp8 for *_kv)
    ids = ref_ckpt.load_tokenizer().encode(TEXT)
    want, _ = forward_logits(ref, ids, chunks=2)
    got, _ = forward_logits(eng, ids, chunks=2)
    assert ((got - want).norm() / want.norm()).item() <= max_err
    report = manifest["report"]
    assert report["quality"]["greedy_agreement"] >= min_agree
    assert report["quality"]["num_prompts"] == 4

    # the stored formats, and the bytes they take
    scheme = QUANT_SCHEMES[qtype]
    layers = manifest["quantization"]["layers"]
    linears = [p for p, m in ref.named_modules() if type(m).__name__ == "Linear"]
    assert set(layers) == {p for p in linears if scheme.covers(p)}
    assert "lm_head" not in layers
    if qtype == "fp4_mlp_only":
        assert layers and all(".mlp." in p for p in layers)
    expected = 0
    for name, p in ref.named_parameters():
        path = name.rpartition(".")[0]
        if path in layers and name.endswith(".weight"):
            m = ref.get_submodule(path)
            specs = make_quant_method(layers[path]).tensor_specs(m.out_features, m.in_features)
            nbytes = sum(torch.Size(s).numel() * d.itemsize for s, d in specs.values())
            assert nbytes / (p.numel() * 4) <= max_ratio
            expected += nbytes
        else:
            expected += p.numel() * 4
    expected += 8 * len(manifest["quantization"]["kv_cache_scales"])
    on_disk = report["size"]["weights_bytes"]
    assert expected <= on_disk <= expected + 64 * 1024  # + the safetensors header
    assert report["size"]["unquantized_bytes"] == sum(p.numel() * 4 for p in ref.parameters())
    assert report["size"]["compression"] == pytest.approx(report["size"]["unquantized_bytes"] / on_disk)
    assert manifest["quantization"]["kv_cache_dtype"] == ("float8_e4m3fn" if qtype.endswith("_kv") else None)


def test_manifest_records_provenance_tokenizer_and_checksums(engines, tiny_llama):
    engine_dir = engines("int8")
    m = json.loads((engine_dir / "manifest.json").read_text())
    assert m["build"]["source"]["path"] == str(tiny_llama)
    assert m["build"]["config"]["trt_llm"]["build"]["quantization_type"] == "int8"
    assert m["chat_template"] and m["tokenizer"]["eos_token_ids"] == [257]
    assert m["quantization"]["calibration"] is None  # weight-only int8 needs no calibration
    assert set(m["weights"]) | {"config.json"} | set(m["tokenizer"]["files"]) == set(m["files"])
    assert all(len(e["sha256"]) == 64 for e in m["files"].values())
    fp8 = json.loads((engines("fp8_kv") / "manifest.json").read_text())["quantization"]
    assert fp8["calibration"]["num_samples"] == 4 and fp8["calibration"]["dataset"] == "ember-mix"
    assert len(fp8["kv_cache_scales"]) == 2


def test_llm_serves_engine_dir_and_fp8_kv_doubles_blocks(engines, tiny_llama):
    from ember import LLM, SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    budget = 1 << 20
    base = LLM(str(tiny_llama), dtype="bfloat16", kv_cache_memory_bytes=budget)
    plain = LLM(str(engines("no_quant")), dtype="bfloat16", kv_cache_memory_bytes=budget)
    fp8kv = LLM(str(engines("fp8_kv")), dtype="bfloat16", kv_cache_memory_bytes=budget)
    assert plain.engine.setup.checkpoint.format == "engine"
    want = base.generate(["Hello there"], params)[0].token_ids
    assert plain.generate(["Hello there"], params)[0].token_ids == want
    assert len(fp8kv.generate(["Hello there"], params)[0].token_ids) == 8
    assert fp8kv.engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    assert fp8kv.engine.setup.num_kv_blocks == 2 * plain.engine.setup.num_kv_blocks
    assert plain.chat_template == base.chat_template


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupted_and_truncated_engines_are_refused(engines, tmp_path):
    src = engines("int8")
    bad = _copy(src, tmp_path / "flipped")
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineFormatError, match=r"model.safetensors is corrupted"):
        load_checkpoint(bad)

    short = _copy(src, tmp_path / "truncated")
    (short / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(EngineFormatError, match=r"model.safetensors is truncated"):
        load_checkpoint(short)

    broken = _copy(src, tmp_path / "manifest")
    (broken / "manifest.json").write_text((src / "manifest.json").read_text()[:200])
    with pytest.raises(EngineFormatError, match=r"manifest.json is corrupted or truncated"):
        load_checkpoint(broken)

    from ember import LLM

    with pytest.raises(EngineFormatError, match="rebuild"):
        LLM(str(bad))


def test_bias_is_refused_where_the_format_cannot_take_it(tmp_path):
    from ember.build.builder import build_engine
    from ember.config import load_config

    qwen2 = write_tiny(tmp_path / "qwen2", "Qwen2")  # q/k/v carry a bias
    with pytest.raises(BuildError, match=r"quantization_type: 'fp4' .*qkv_proj has a bias"):
        build_engine(load_config(build_config(qwen2, "fp4")), tmp_path / "out", progress=False, log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_calibration_datasets(tmp_path):
    txt = tmp_path / "calib.txt"
    txt.write_text("first document\n\nsecond document\n")
    assert load_texts(str(txt)) == ["first document", "second document"]
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text('{"text": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n"c"\n')
    assert load_texts(str(jsonl)) == ["a", "b", "c"]
    assert len(load_texts(None)) >= 10
    with pytest.raises(BuildError, match=r"calib_dataset: 'cnn_dailymail' .*no network"):
        load_texts("cnn_dailymail")


def test_cli_build_with_local_calibration_file(tiny_llama, tmp_path, capsys):
    import yaml

    from ember.cli import main

    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"sample {i}: " + "words and code() " * 8}) for i in range(3)))
    cfg = build_config(tiny_llama, "fp8", calib_dataset=str(calib))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["build", str(tmp_path / "config.yaml"), "-o", str(tmp_path / "engine"), "--num-eval-prompts", "2"]) == 0
    out = capsys.readouterr().out
    assert "smaller" in out and "greedy agreement" in out and "dequantized on the fly" in out
    m = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert m["quantization"]["calibration"]["dataset"] == str(calib)
    assert m["quantization"]["calibration"]["num_samples"] == 3


def test_engine_dir_config_keeps_its_build_settings(tiny_llama, tmp_path):
    from ember.build.builder import build_engine
    from ember.config import load_config

    data = build_config(tiny_llama, "int8")
    data["trt_llm"]["build"].update(max_seq_len=96, max_batch_size=3)
    out = build_engine(load_config(data), tmp_path / "e", int4_group_size=64, num_eval_prompts=2,
                       eval_max_seq_length=32, progress=False, log=lambda *_: None)
    cfg = load_config(str(out))
    b = cfg.trt_llm.build
    assert (b.max_seq_len, b.max_batch_size, b.quantization_type) == (96, 3, "int8")
    assert cfg.model_name == "tiny" and b.checkpoint_repository.repo == str(out)
    assert load_config(str(out), max_batch_size=5).trt_llm.build.max_batch_size == 5  # serve-time override wins
