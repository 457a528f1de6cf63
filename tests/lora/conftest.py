"""Tiny random Llama and Qwen2 checkpoints, and random PEFT LoRA adapters made for them with the peft library."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from ember.checkpoint.default import default_model_path

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig kwargs: different ranks, targets and scalings, so a mixed batch tells them apart
ADAPTERS = {
    "all-r4": dict(r=4, lora_alpha=8, target_modules=ALL_TARGETS),
    "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mlp-r2-rs": dict(r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj", "down_proj"], use_rslora=True),
}
BASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
}


def make_base(kind: str, path: Path, *, with_tokenizer: bool = True) -> Path:
    import transformers

    cfg_name, arch, extra = BASES[kind]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2, bos_token_id=1, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg)
    with torch.no_grad():  # a peaky distribution so greedy ties are rare
        model.model.embed_tokens.weight.mul_(8.0)
    model.save_pretrained(path, safe_serialization=True)
    if with_tokenizer:
        gguf = default_model_path()
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(path)
    return path


def make_adapter(base_dir: Path, out_dir: Path, seed: int, **lora_kwargs) -> Path:
    """A PEFT adapter with random A and B (B is zero at PEFT's default init, which would test nothing)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def merged_reference(base_dir: Path, adapter_dir: Path | None):
    """transformers model with the adapter merged in by peft (None: the base model)."""
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    if adapter_dir is None:
        return base
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


@pytest.fixture(scope="session")
def lora_models(tmp_path_factory) -> dict[str, tuple[Path, dict[str, Path]]]:
    """kind -> (base checkpoint dir, {adapter name: PEFT adapter dir})."""
    out = {}
    for kind in BASES:
        root = tmp_path_factory.mktemp(f"lora_{kind}")
        base = make_base(kind, root / "base")
        adapters = {name: make_adapter(base, root / name, seed=i + 1, **kw)
                    for i, (name, kw) in enumerate(ADAPTERS.items())}
        out[kind] = (base, adapters)
    return out


def lora_config(base: Path, adapters: dict[str, Path], **ember) -> dict:
    return {"model_name": "tiny",
            "trt_llm": {"build": {"checkpoint_repository": {"source": "LOCAL", "repo": str(base)},
                                  "max_seq_len": 256, "max_batch_size": 8, "max_num_tokens": 256,
                                  "lora_adapters": {n: {"source": "LOCAL", "repo": str(p)} for n, p in adapters.items()},
                                  "lora_configuration": {"max_lora_rank": 16}}},
            "ember": {"dtype": "float32", "device": "cpu", "kv_cache_memory_bytes": 16 << 20, **ember}}
