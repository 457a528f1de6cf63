"""int4: GGUF 4-bit grids kept exactly (against gguf's own dequantization), the CPU kernels against a float64
reference at every batch size they serve, GPTQ against round-to-nearest, and a lossless build from a GGUF."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

from ember.checkpoint.gguf_grid import int4_grid
from ember.checkpoint.gguf_reader import read_gguf
from ember.layers.linear import Linear
from ember.layers.quant import int4_cpu
from ember.layers.quant.int4 import Int4Method

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 64, 128, 96, 4, 2


def _q4k_blocks(rng, rows: int, cols: int) -> np.ndarray:
    """Random Q4_K rows (gguf-py cannot quantize K-quants): any bytes are a valid block once d/dmin are sane."""
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:4] = rng.uniform(0.001, 0.05, size=(rows, cols // 256, 2)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _write_gguf(path, tensors: list[tuple[str, np.ndarray, Q]], *, llama: bool = False) -> None:
    writer = GGUFWriter(str(path), "llama")
    if llama:
        for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 128),
                           (writer.add_embedding_length, HIDDEN), (writer.add_feed_forward_length, INTER),
                           (writer.add_head_count, HEADS), (writer.add_head_count_kv, KV_HEADS),
                           (writer.add_rope_freq_base, 10000.0), (writer.add_layer_norm_rms_eps, 1e-6),
                           (writer.add_vocab_size, VOCAB), (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2)):
            add(value)
        writer.add_tokenizer_model("gpt2")
        tokens = [bytes([i]).decode("latin-1") for i in range(VOCAB)]
        writer.add_token_list(tokens)
        writer.add_token_types([1] * VOCAB)
        writer.add_token_scores([0.0] * VOCAB)
    for name, data, qtype in tensors:
        writer.add_tensor(name, data, raw_dtype=qtype)  # quantized data as bytes: gguf derives the shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_grids_reproduce_gguf_dequantization_exactly(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 512)).astype(np.float32)
    tensors = [("a", quantize(w, Q.Q4_0), Q.Q4_0), ("b", quantize(w, Q.Q4_1), Q.Q4_1),
               ("c", _q4k_blocks(rng, 48, 512), Q.Q4_K), ("d", quantize(w, Q.Q8_0), Q.Q8_0)]
    _write_gguf(tmp_path / "g.gguf", tensors)
    gguf = read_gguf(tmp_path / "g.gguf")
    for name, data, qtype in tensors:
        info = gguf.tensors[name]
        grid = int4_grid(gguf, info)
        if qtype == Q.Q8_0:
            assert grid is None
            continue
        reference = torch.from_numpy(dequantize(gguf.raw(info), qtype).reshape(info.shape))
        scale_dtype = "float32" if qtype == Q.Q4_K else "float16"  # Q4_K's d * sc products need float32
        method = Int4Method(32, scale_dtype)
        stored = method.pack(grid.codes, grid.scale, grid.minimum)
        got = method.dequantize_stored(stored["weight"], stored["weight_scale"], stored["weight_min"])
        assert torch.equal(got, reference), qtype.name  # bit for bit, not approximately


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features", [192, 96])  # 96: not a whole number of the kernel's 64-row blocks
def test_cpu_kernel_every_batch_size_matches_float_reference(dtype, out_features):
    torch.manual_seed(0)
    method = Int4Method(32)
    stored = method.quantize(torch.randn(out_features, 128) * 0.05)
    dense = method.dequantize_stored(stored["weight"], stored["weight_scale"], stored["weight_min"]).double()
    layer = Linear(128, out_features, dtype=dtype)
    layer.set_quant_method(method, dtype, "cpu")
    for key, t in stored.items():
        getattr(layer, key).data.copy_(t)
    layer.process_weights_after_loading()
    assert layer.cpu_kernel is not None
    assert torch.equal(method.dequantize(layer), dense.float()) or dtype == torch.bfloat16
    for rows in (1, int4_cpu.MAX_GEMV_ROWS, int4_cpu.MAX_GEMV_ROWS + 1, 40):  # both kernels, and the switch
        x = torch.randn(rows, 128, dtype=dtype)
        want = x.double() @ dense.t()
        got = layer(x).double()
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < (1e-6 if dtype == torch.float32 else 2e-2), (rows, rel)


def test_gptq_beats_round_to_nearest_on_a_tiny_model(tiny_llama):
    """Every int4 Linear of a tiny llama, with Hessians from the calibration text: GPTQ's output error on
    those inputs is lower than round-to-nearest's, layer by layer and clearly so in total."""
    from ember.build.calibration import load_texts, tokenize_samples
    from ember.build.gptq import collect_hessians, gptq_quantize, output_error
    from ember.checkpoint import load_checkpoint
    from ember.models.registry import get_model_class

    ckpt = load_checkpoint(tiny_llama)
    model = get_model_class(ckpt.architecture)(ckpt.hf_config, dtype=torch.float32, device="cpu")
    model.load_weights(ckpt.iter_weights())
    paths = [p for p, m in model.named_modules() if isinstance(m, Linear) and p != "lm_head"]
    samples = tokenize_samples(ckpt.load_tokenizer(), load_texts(None), 4, 64)
    hessians = collect_hessians(model, samples, paths, progress=False)
    assert set(hessians) == set(paths)
    total_rtn = total_gptq = 0.0
    for path in paths:
        weight = model.get_submodule(path).weight.detach()
        method = Int4Method(32)
        rtn, gptq = method.quantize(weight), gptq_quantize(method, weight, hessians[path])
        err_rtn = output_error(weight, method.dequantize_stored(*rtn.values()), hessians[path])
        err_gptq = output_error(weight, method.dequantize_stored(*gptq.values()), hessians[path])
        assert err_gptq < err_rtn, (path, err_gptq, err_rtn)
        total_rtn, total_gptq = total_rtn + err_rtn, total_gptq + err_gptq
    assert total_gptq < 0.85 * total_rtn, (total_gptq, total_rtn)


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """A one-layer llama GGUF whose gate is Q4_0 and up and down Q4_1 (so gate|up and down keep the file's
    grids) while q is Q8_0 (so q|k|v, with k and v on 4-bit grids, goes through GPTQ) and o is F16."""
    rng = np.random.default_rng(0)
    kv = HIDDEN // HEADS * KV_HEADS
    spec = [("token_embd", (VOCAB, HIDDEN), Q.F32), ("output_norm", (HIDDEN,), Q.F32),
            ("output", (VOCAB, HIDDEN), Q.F32), ("blk.0.attn_norm", (HIDDEN,), Q.F32),
            ("blk.0.ffn_norm", (HIDDEN,), Q.F32), ("blk.0.attn_q", (HIDDEN, HIDDEN), Q.Q8_0),
            ("blk.0.attn_k", (kv, HIDDEN), Q.Q4_1), ("blk.0.attn_v", (kv, HIDDEN), Q.Q4_0),
            ("blk.0.attn_output", (HIDDEN, HIDDEN), Q.F16), ("blk.0.ffn_gate", (INTER, HIDDEN), Q.Q4_0),
            ("blk.0.ffn_up", (INTER, HIDDEN), Q.Q4_1), ("blk.0.ffn_down", (HIDDEN, INTER), Q.Q4_1)]
    tensors = []
    for name, shape, qtype in spec:
        w = (rng.standard_normal(shape) * (0.1 if len(shape) == 2 else 1.0)).astype(np.float32)
        if name.endswith("norm"):
            w = np.ones(shape, dtype=np.float32)
        tensors.append((f"{name}.weight", w if qtype == Q.F32 else quantize(w, qtype), qtype))
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    _write_gguf(path, tensors, llama=True)
    return path


def test_build_from_gguf_keeps_the_file_grid(mixed_gguf, tmp_path):
    from ember.build.builder import build_engine
    from ember.checkpoint import load_checkpoint
    from ember.config import load_config
    from ember.models.registry import get_model_class

    cfg = load_config({"model_name": "tiny", "trt_llm": {"build": {
        "checkpoint_repository": {"source": "LOCAL", "repo": str(mixed_gguf)}, "quantization_type": "int4",
        "quantization_config": {"calib_size": 2, "calib_max_seq_length": 32}}},
        "ember": {"dtype": "float32", "device": "cpu"}})
    engine_dir = build_engine(cfg, tmp_path / "e", int4_group_size=64, num_eval_prompts=1, eval_max_seq_length=32,
                              progress=False, log=lambda *_: None)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    grids = manifest["quantization"]["int4_grids"]
    layers = manifest["quantization"]["layers"]
    assert grids["lossless"] == {"model.layers.0.mlp.gate_up_proj": ["Q4_0", "Q4_1"],
                                 "model.layers.0.mlp.down_proj": ["Q4_1"]}
    assert sorted(grids["gptq"]) == ["model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.qkv_proj"]
    assert layers["model.layers.0.mlp.down_proj"] == {"method": "int4", "group_size": 32, "scale_dtype": "float16"}
    assert layers["model.layers.0.self_attn.qkv_proj"]["group_size"] == 64

    # the engine's int4 weights of the lossless layers are the GGUF's float32 weights, bit for bit
    src = load_checkpoint(mixed_gguf)
    ref = get_model_class(src.architecture)(src.hf_config, dtype=torch.float32, device="cpu")
    ref.load_weights(src.iter_weights())
    eng_ckpt = load_checkpoint(engine_dir)
    eng = get_model_class(eng_ckpt.architecture)(eng_ckpt.hf_config, dtype=torch.float32, device="cpu")
    eng.load_weights(eng_ckpt.iter_weights())
    for path in grids["lossless"]:
        got = eng.get_submodule(path).quant_method.dequantize(eng.get_submodule(path))
        assert torch.equal(got, ref.get_submodule(path).weight), path
    assert abs(manifest["report"]["quality"]["perplexity_delta_pct"]) < 50


def test_version_1_engines_load_unless_they_hold_int4(engines, tmp_path):
    """Format version 2 changed only int4's stored layout: an old int8 engine still loads, an old int4 engine
    is refused with a message that says to rebuild it."""
    import shutil

    from ember.build.engine_dir import EngineFormatError
    from ember.checkpoint import load_checkpoint

    for qtype in ("int8", "int4"):
        old = shutil.copytree(engines(qtype), tmp_path / qtype)
        manifest = json.loads((old / "manifest.json").read_text())
        manifest["format_version"] = 1
        (old / "manifest.json").write_text(json.dumps(manifest))
        if qtype == "int8":
            assert load_checkpoint(old).format == "engine"
        else:
            with pytest.raises(EngineFormatError, match="int4 engine of format_version 1 .* rebuild it"):
                load_checkpoint(old)
