"""GGUF loading of Gemma 3, Mixtral (llama.cpp writes it as a "llama" GGUF with experts) and Qwen3-MoE: a tiny
random checkpoint is written as a GGUF with gguf's GGUFWriter the way llama.cpp's converter lays it out (experts
stacked as ffn_{gate,up,down}_exps, Q/K rows interleaved for llama, Gemma norms stored as 1 + w), and ember's
model loaded from it gives transformers' logits of the original checkpoint."""

import re

import numpy as np
import pytest
import torch
import transformers
from gguf import MODEL_ARCH, GGUFWriter, get_tensor_name_map
from safetensors.torch import load_file

from ember.build.calibration import forward_logits
from ember.checkpoint import load_checkpoint
from ember.models.registry import get_model_class

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
# gguf architecture -> (HF config class, HF model class, overrides)
ARCHS = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=6, rope_theta=50000.0)),
    "llama": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                          intermediate_size=48, tie_word_embeddings=False,
                                                          rope_theta=10000.0)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, head_dim=16,
                                                               moe_intermediate_size=32, norm_topk_prob=True,
                                                               tie_word_embeddings=False, rope_theta=10000.0)),
}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_EXPS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def _permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row order for llama (rotary halves interleaved)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, arch: str, cfg, state: dict[str, torch.Tensor], rope_theta: float) -> None:
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if arch != "llama":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
    else:
        writer.add_expert_count(getattr(cfg, "num_local_experts", None) or cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "qwen3moe":
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    name_map = get_tensor_name_map(next(a for a in MODEL_ARCH if a.name.lower() == arch), cfg.num_hidden_layers)
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        m = _EXPERT.match(name)
        if m:
            experts.setdefault((int(m.group(1)), _EXPS[m.group(3)]), {})[int(m.group(2))] = tensor
            continue
        base, _, suffix = name.rpartition(".")
        gguf_name = f"{name_map.get_name(base)}.{suffix}"
        w = tensor.float().numpy()
        if arch == "llama" and ".attn_q." in gguf_name:
            w = _permute(w, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            w = _permute(w, cfg.num_key_value_heads)
        if arch == "gemma3" and "norm" in gguf_name:
            w = w + 1.0  # llama.cpp stores Gemma's (1 + w)
        writer.add_tensor(gguf_name, np.ascontiguousarray(w, dtype=np.float32))
    for (layer, part), per_expert in sorted(experts.items()):
        stacked = torch.stack([per_expert[e] for e in sorted(per_expert)]).float().numpy()  # [E, out, in]
        writer.add_tensor(f"blk.{layer}.ffn_{part}_exps.weight", np.ascontiguousarray(stacked))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gguf_logits_match_transformers(arch, tmp_path):
    cfg_cls, model_cls, overrides = ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**_BASE, **overrides})
    hf = getattr(transformers, model_cls)(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    state = load_file(tmp_path / "hf" / "model.safetensors")
    _write_gguf(tmp_path / "tiny.gguf", arch, cfg, state, overrides["rope_theta"])

    ckpt = load_checkpoint(tmp_path / "tiny.gguf")
    assert ckpt.architecture == model_cls
    ours = get_model_class(ckpt.architecture)(ckpt.hf_config, dtype=torch.float32, device="cpu")
    ours.load_weights(ckpt.iter_weights())
    ids = [5, 17, 90, 33, 4, 8, 9, 10, 11, 12, 13, 60, 61]
    got, _ = forward_logits(ours.eval(), ids, chunks=2)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    assert ((got - want).norm() / want.norm()).item() < 1e-4
