"""Tiny random checkpoints of every supported architecture, and a paged-KV generation loop for our models."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ember.layers.attention import build_attention_metadata
from ember.models.registry import get_model_class
from ember.worker.kv_cache import allocate_kv_caches

_COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, pad_token_id=0,
    bos_token_id=1, eos_token_id=None, tie_word_embeddings=False,
)

# name -> (HF config class, overrides). Each variant exercises something its family configures.
VARIANTS = {
    "llama": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                     tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                                         num_hidden_layers=3, sliding_window_pattern=2, rope_local_base_freq=100.0,
                                         rope_theta=50000.0, attn_logit_softcapping=2.0,
                                         final_logit_softcapping=3.0, tie_word_embeddings=True)),
    # Gemma 3's vision-language checkpoint: ember loads the language model under model.language_model.
    "gemma3_vl": ("Gemma3Config", dict(text_config=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=0.1,
        query_pre_attn_scalar=16, sliding_window=5, attn_logit_softcapping=4.0, final_logit_softcapping=5.0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4, image_token_index=255,
        tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         head_dim=16, norm_topk_prob=False, mlp_only_layers=[1])),
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5, pad_token_id=0)),
    "phi3_longrope": ("Phi3Config", dict(
        max_position_embeddings=64, original_max_position_embeddings=16, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0 + 0.1 * i for i in range(8)],
                         "long_factor": [2.0 + 0.5 * i for i in range(8)]})),
}

_ARCHS = {"Gemma3TextConfig": "Gemma3ForCausalLM", "Gemma3Config": "Gemma3ForConditionalGeneration"}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Every variant saved as a safetensors checkpoint: name -> directory."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, (cls_name, overrides) in VARIANTS.items():
        torch.manual_seed(0)
        kwargs = overrides if "text_config" in overrides else {**_COMMON, **overrides}
        cfg = getattr(transformers, cls_name)(**kwargs)
        cfg._attn_implementation = "eager"
        arch = _ARCHS.get(cls_name, cls_name.replace("Config", "ForCausalLM"))
        model = getattr(transformers, arch)(cfg).eval()
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        out[name] = str(path)
    return out


def load_hf(path: str, dtype: torch.dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval()


def load_ours(path: str, dtype: torch.dtype):
    cfg = transformers.AutoConfig.from_pretrained(path)
    model = get_model_class(cfg.architectures[0])(cfg, dtype=dtype, device=torch.device("cpu"))
    model.load_weights(load_file(os.path.join(path, "model.safetensors")).items())
    return model


class PagedSession:
    """Drives one of our models through the paged-KV path: shuffled block ids, chunked prefill, decodes."""

    def __init__(self, model, dtype, *, block_size: int = 4, num_blocks: int = 128, seed: int = 0):
        self.model, self.block_size = model, block_size
        self.kv = allocate_kv_caches(model.num_layers, num_blocks, block_size, model.num_kv_heads,
                                     model.head_dim, dtype, "cpu")
        self.free = list(range(1, num_blocks))
        random.Random(seed).shuffle(self.free)
        self.blocks: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """One forward over several sequences' new tokens -> each sequence's logits [n_new, V]."""
        ids, pos, q_lens, s_lens, tables = [], [], [], [], []
        for sid, toks in new_tokens.items():
            start = self.lens.get(sid, 0)
            end = start + len(toks)
            table = self.blocks.setdefault(sid, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            self.lens[sid] = end
            ids += toks
            pos += range(start, end)
            q_lens.append(len(toks))
            s_lens.append(end)
            tables.append(table)
        md = build_attention_metadata(q_lens, s_lens, tables, self.block_size, "cpu")
        with torch.no_grad():
            hidden = self.model.forward(torch.tensor(ids), torch.tensor(pos), self.kv, md)
            logits = self.model.compute_logits(hidden)
        out, o = {}, 0
        for sid, n in zip(new_tokens, q_lens):
            out[sid] = logits[o : o + n]
            o += n
        return out

    def greedy(self, prompt: list[int], num_new: int, chunk: int | None = None, sid: int = 0) -> list[int]:
        chunk = chunk or len(prompt)
        for i in range(0, len(prompt), chunk):
            logits = self.step({sid: prompt[i : i + chunk]})[sid]
        tokens = [int(logits[-1].argmax())]
        while len(tokens) < num_new:
            tokens.append(int(self.step({sid: [tokens[-1]]})[sid][-1].argmax()))
        return tokens


@pytest.fixture
def paged_session():
    return PagedSession
