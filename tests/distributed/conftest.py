"""Tiny random checkpoints (one per supported architecture) with the default model's tokenizer, for the
tensor-parallel tests: each runs with tensor_parallel_count 1 and 2 (two gloo processes on the CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tp_models import _COMMON, ARCHS, NEW_ARCHS, QUANT

from ember.checkpoint.default import default_model_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    import torch
    import transformers
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tp_ckpt")
    gguf = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = {}
    variants = {arch: (arch, *spec) for arch, spec in (ARCHS | NEW_ARCHS).items()} | {"quant": QUANT}
    for name, (arch, cfg_name, overrides) in variants.items():
        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_name)(**{**_COMMON, **overrides})
        model = getattr(transformers, arch)(cfg)
        with torch.no_grad():  # peaky logits: greedy ties (which any reordering of a sum could flip) are rare
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(8.0 if name == "quant" else 4.0)  # a big vocabulary needs more to stand out
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        out[name] = path
    return out
