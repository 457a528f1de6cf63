"""GGUF tensors -> Hugging Face-named float32 tensors: dequantize, rename, undo llama.cpp's layouts."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, get_tensor_name_map
from gguf.constants import MODEL_ARCH_NAMES
from gguf.quants import dequantize as gguf_dequantize

from ember.checkpoint.gguf_reader import GGUFFile, GGUFTensorInfo

# GGUF general.architecture -> transformers class name. Mistral GGUFs carry "llama".
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# a "llama" GGUF with experts (llama.expert_count) is Mixtral, as llama.cpp's converter writes it
_LLAMA_MOE = "MixtralForCausalLM"
# experts stacked over dim 0 ([E, ...]): ember's MoE models split them per expert (ember.models.moe)
_STACKED_EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
# llama.cpp's converter interleaves Q/K rows per head for these (rotary pairs (i, i+d/2) -> (2i, 2i+1))
_PERMUTED_QK_ARCHS = {"llama"}
# llama.cpp's converter stores Gemma norms as 1 + w, transformers' Gemma norms hold w
_NORM_PLUS_ONE_ARCHS = {"gemma2", "gemma3"}
# tensors llama.cpp adds that are buffers computed from the config on the transformers side
_SKIPPED_TENSORS = re.compile(r"^(rope_freqs|rope_factors_long|rope_factors_short)\.weight$")


def gguf_architecture(gguf: GGUFFile) -> str:
    """The HF class name of a GGUF's architecture; an unknown one is an error naming the known ones."""
    arch = gguf.architecture
    if arch not in GGUF_ARCHITECTURES:
        known = ", ".join(sorted(GGUF_ARCHITECTURES))
        raise ValueError(f"{gguf.path}: GGUF architecture {arch!r} is not recognised; known: {known}.")
    if arch == "llama" and gguf.metadata.get("llama.expert_count", 0) > 0:
        return _LLAMA_MOE
    return GGUF_ARCHITECTURES[arch]


def dequantize_tensor(gguf: GGUFFile, info: GGUFTensorInfo) -> torch.Tensor:
    """One tensor as float32 in torch layout (GGUF dims reversed), a fresh copy owned by the caller."""
    raw = gguf.raw(info)
    if info.ggml_type == GGMLQuantizationType.F32:
        return torch.from_numpy(raw.view(np.float32).reshape(info.shape).copy())
    if info.ggml_type == GGMLQuantizationType.F16:
        return torch.from_numpy(raw.view(np.float16).astype(np.float32)).reshape(info.shape)
    if info.ggml_type == GGMLQuantizationType.BF16:  # numpy has no bfloat16: widen the bits by hand
        bits = raw.view(np.uint16).astype(np.uint32) << 16
        return torch.from_numpy(bits.view(np.float32)).reshape(info.shape)
    # gguf's numpy reference dequantizers handle every ggml block type (Q8_0, Q4_0/1, K-quants, IQ*)
    values = gguf_dequantize(raw, info.ggml_type)  # [rows..., row_elements] float32
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)


def gguf_to_hf_names(gguf: GGUFFile, hf_config) -> dict[str, str]:
    """{gguf_name: hf_name} for every tensor of the file, as transformers' GGUF loader names them.

    Like transformers, the HF names come from the model class itself (instantiated on the meta device,
    so no memory is spent) and are matched through gguf-py's per-architecture TensorNameMap.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    arch = next(key for key, name in MODEL_ARCH_NAMES.items() if name == gguf.architecture)
    name_map = get_tensor_name_map(arch, hf_config.num_hidden_layers)
    mapping = {}
    for gguf_name in gguf.tensors:  # transformers' own MoE layout (fused gate|up) has no per-part names
        m = _STACKED_EXPERTS.match(gguf_name)
        if m:
            mapping[gguf_name] = f"model.layers.{m.group(1)}.mlp.experts.{m.group(2)}_proj"
    for hf_name in model.state_dict():
        base, dot, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base) if dot else None
        if gguf_base is not None:
            mapping.setdefault(f"{gguf_base}.{suffix}", hf_name)
    unmapped = [n for n in gguf.tensors if n not in mapping and not _SKIPPED_TENSORS.match(n)]
    if unmapped:
        raise ValueError(f"{gguf.path}: GGUF tensors with no {type(model).__name__} counterpart: {unmapped[:5]}.")
    return mapping


def iter_gguf_weights(gguf: GGUFFile, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, float32 tensor) one at a time, in file order; nothing is held between yields."""
    names = gguf_to_hf_names(gguf, hf_config)
    arch = gguf.architecture
    for gguf_name, info in gguf.tensors.items():
        if gguf_name not in names:
            continue  # a computed buffer (rope factors), see _SKIPPED_TENSORS
        tensor = dequantize_tensor(gguf, info)
        if arch in _PERMUTED_QK_ARCHS and ".attn_q." in gguf_name:
            tensor = unpermute_qk(tensor, hf_config.num_attention_heads)
        elif arch in _PERMUTED_QK_ARCHS and ".attn_k." in gguf_name:
            tensor = unpermute_qk(tensor, hf_config.num_key_value_heads)
        if arch in _NORM_PLUS_ONE_ARCHS and "norm" in gguf_name and gguf_name.endswith(".weight"):
            tensor -= 1.0
        yield names[gguf_name], tensor


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of a Q or K projection (weight [out, in] or bias [out]).

    llama.cpp stores each head's rows as interleaved rotary pairs; HF keeps the two halves apart.
    """
    head_half = weight.shape[0] // num_heads // 2
    # [num_heads, 2, head_half, ...] <- [num_heads, head_half, 2, ...]
    w = weight.reshape(num_heads, head_half, 2, *weight.shape[1:]).transpose(1, 2)
    return w.reshape(weight.shape).contiguous()
