"""A tiny llama GGUF written here with gguf.GGUFWriter, one quantization type per tensor."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from ember.checkpoint import load_checkpoint
from ember.checkpoint.gguf_reader import read_gguf
from ember.checkpoint.gguf_weights import dequantize_tensor

HIDDEN, INTER, VOCAB, LAYERS, HEADS, KV_HEADS = 64, 128, 96, 2, 4, 2

# per layer tensor: (gguf name, hf name, [out, in], storage type)
LAYER_TENSORS = [
    ("attn_q", "self_attn.q_proj", (HIDDEN, HIDDEN), Q.Q4_0),
    ("attn_k", "self_attn.k_proj", (HIDDEN // HEADS * KV_HEADS, HIDDEN), Q.Q4_1),
    ("attn_v", "self_attn.v_proj", (HIDDEN // HEADS * KV_HEADS, HIDDEN), Q.F16),
    ("attn_output", "self_attn.o_proj", (HIDDEN, HIDDEN), Q.BF16),
    ("ffn_gate", "mlp.gate_proj", (INTER, HIDDEN), Q.Q8_0),
    ("ffn_up", "mlp.up_proj", (INTER, HIDDEN), Q.Q4_1),
    ("ffn_down", "mlp.down_proj", (HIDDEN, INTER), Q.Q4_0),
    ("attn_norm", "input_layernorm", (HIDDEN,), Q.F32),
    ("ffn_norm", "post_attention_layernorm", (HIDDEN,), Q.F32),
]
# the tolerance each type's round trip is held to, relative to the tensor's largest magnitude
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1e-2, Q.Q4_1: 0.1, Q.Q4_0: 0.15}


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Q/K rows (the inverse of what ember undoes)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path, {hf_name: (original float32 HF-layout weight, storage type)})."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ messages[0]['content'] }}")

    originals = {}
    tensors = [("token_embd", "model.embed_tokens", (VOCAB, HIDDEN), Q.Q8_0),
               ("output_norm", "model.norm", (HIDDEN,), Q.F32),
               ("output", "lm_head", (VOCAB, HIDDEN), Q.F16)]
    for i in range(LAYERS):
        tensors += [(f"blk.{i}.{g}", f"model.layers.{i}.{h}", shape, qtype) for g, h, shape, qtype in LAYER_TENSORS]
    for gguf_name, hf_name, shape, qtype in tensors:
        w = rng.standard_normal(shape).astype(np.float32)
        stored = w
        if ".attn_q" in gguf_name:
            stored = llama_cpp_permute(w, HEADS)
        elif ".attn_k" in gguf_name:
            stored = llama_cpp_permute(w, KV_HEADS)
        data = stored if qtype == Q.F32 else quantize(stored, qtype)
        writer.add_tensor(f"{gguf_name}.weight", data, raw_dtype=qtype)
        originals[f"{hf_name}.weight"] = (w, qtype, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, originals


def test_tiny_gguf_config(tiny_gguf):
    path, _ = tiny_gguf
    ckpt = load_checkpoint(path)
    cfg = ckpt.hf_config
    assert ckpt.architecture == "LlamaForCausalLM" and cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (HIDDEN, INTER, LAYERS)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (HEADS, KV_HEADS, VOCAB)
    assert cfg.tie_word_embeddings is False  # the file has its own output.weight
    assert ckpt.eos_token_ids == [2] and ckpt.bos_token_id == 1 and ckpt.max_position_embeddings == 256
    assert ckpt.chat_template == "{{ messages[0]['content'] }}"


def test_tiny_gguf_weights_every_type(tiny_gguf):
    path, originals = tiny_gguf
    seen = {}
    for name, tensor in load_checkpoint(path).iter_weights():
        original, qtype, data = originals[name]
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == original.shape, name
        # exactly gguf's reference dequantization, with llama.cpp's Q/K permutation undone
        reference = data if qtype == Q.F32 else dequantize(data, qtype)
        if ".q_proj" in name or ".k_proj" in name:  # transformers' own inverse of llama.cpp's permutation
            num_heads = KV_HEADS if ".k_proj" in name else HEADS
            reference = LlamaTensorProcessor()._reverse_permute_weights(reference, HEADS, num_heads)
        assert np.array_equal(tensor.numpy(), reference), name
        seen[name] = qtype
        # close to the original: only true when the permutation was undone the right way round
        error = (tensor - torch.from_numpy(original)).abs().max().item()
        assert error <= TOLERANCE[qtype] * np.abs(original).max() + 1e-7, (name, qtype, error)
    assert set(seen) == set(originals)
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1} <= set(seen.values())


def test_raw_reads_match_gguf_reference_exactly(tiny_gguf):
    path, originals = tiny_gguf
    gguf = read_gguf(path)
    for gguf_name, info in gguf.tensors.items():
        ours = dequantize_tensor(gguf, info).numpy()
        raw = gguf.raw(info)
        assert np.array_equal(ours, dequantize(raw, info.ggml_type).reshape(info.shape)), gguf_name


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_k_quants_match_an_independent_dequantizer(tmp_path, qtype):
    """gguf-py cannot quantize K-quants and the default model has none: random blocks with sane scales,
    dequantized by ember and by transformers' own torch implementation."""
    from transformers.integrations.gguf.dequant import dequantize as transformers_dequantize

    rng = np.random.default_rng(1)
    rows, cols = 8, 512
    block_bytes = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, size=(rows, cols // 256, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:
        blocks[..., 0:4] = scales  # d and dmin lead the block
    else:
        blocks[..., 208:210] = scales[..., :2]  # d trails the block
    data = blocks.reshape(rows, -1)
    path = tmp_path / "k.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_down.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    gguf = read_gguf(path)
    ours = dequantize_tensor(gguf, gguf.tensors["blk.0.ffn_down.weight"])
    assert ours.shape == (rows, cols)
    theirs = transformers_dequantize(torch.from_numpy(data.copy()), int(qtype)).reshape(rows, cols)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)


def test_unknown_gguf_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'mamba' is not recognised; known: .*llama"):
        load_checkpoint(path)
