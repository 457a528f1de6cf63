"""A tiny random Llama whose Linears dominate its size (byte-level tokenizer, 258 tokens), and engines
built from it once per quantization type for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny(path: Path, cls_name: str = "Llama", **overrides) -> Path:
    import transformers

    cfg = getattr(transformers, f"{cls_name}Config")(**{**dict(
        vocab_size=258, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=256,
        eos_token_id=257, pad_token_id=257), **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls_name}ForCausalLM")(cfg)
    with torch.no_grad():  # a peaky next-token distribution, so greedy choices are not coin flips
        model.lm_head.weight.mul_(12.0) if model.lm_head is not None else None
    model.save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def build_config(ckpt: Path, quantization_type: str, **quant_config) -> dict:
    return {"model_name": "tiny", "trt_llm": {"build": {
        "checkpoint_repository": {"source": "LOCAL", "repo": str(ckpt)},
        "quantization_type": quantization_type,
        "quantization_config": {"calib_size": 4, "calib_max_seq_length": 64, **quant_config}}},
        "ember": {"dtype": "float32", "device": "cpu"}}


@pytest.fixture(scope="session")
def engines(tiny_llama, tmp_path_factory):
    """quantization_type -> engine dir, built on first use."""
    from ember.build.builder import build_engine
    from ember.config import load_config

    root = tmp_path_factory.mktemp("engines")
    built: dict[str, Path] = {}

    def get(qtype: str) -> Path:
        if qtype not in built:
            cfg = load_config(build_config(tiny_llama, qtype))
            built[qtype] = build_engine(cfg, root / qtype, int4_group_size=64, num_eval_prompts=4,
                                        eval_max_seq_length=64, progress=False, log=lambda *_: None)
        return built[qtype]

    return get
