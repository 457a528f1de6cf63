"""Quantized experts: `ember build` with int8 / int4 / fp8 on a tiny Mixtral quantizes every expert's gate|up and
down Linear through the same formats as dense layers (the router stays in the model dtype), and the engine's
logits stay close to the unquantized model's."""

from __future__ import annotations

import json

import pytest
import torch

from ember.build.calibration import forward_logits
from ember.checkpoint import load_checkpoint
from ember.models.registry import get_model_class

from build_support import build_config, write_tiny

# type -> max relative logit error (the dense tiny Llama's bounds in test_build.py)
TOLERANCE = {"int8": 0.03, "int4": 0.25, "fp8": 0.08}
TEXT = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral", "Mixtral", num_local_experts=4,
                      num_experts_per_tok=2, intermediate_size=128)


def _model(path):
    ckpt = load_checkpoint(path)
    model = get_model_class(ckpt.architecture)(ckpt.hf_config, dtype=torch.float32, device="cpu")
    model.load_weights(ckpt.iter_weights())
    return model.eval(), ckpt


@pytest.mark.parametrize("qtype", list(TOLERANCE))
def test_quantized_experts_stay_close(qtype, tiny_mixtral, tmp_path):
    from ember.build.builder import build_engine
    from ember.config import load_config

    cfg = load_config(build_config(tiny_mixtral, qtype, calib_size=2, calib_max_seq_length=32))
    engine_dir = build_engine(cfg, tmp_path / qtype, int4_group_size=64, num_eval_prompts=1, eval_max_seq_length=16,
                              progress=False, log=lambda *_: None)
    layers = json.loads((engine_dir / "manifest.json").read_text())["quantization"]["layers"]
    experts = {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(2) for e in range(4)
               for p in ("gate_up_proj", "down_proj")}
    assert experts <= set(layers) and all(layers[p]["method"] == qtype for p in experts)
    assert not any(p.endswith(".mlp.gate") for p in layers)
    ref, ckpt = _model(tiny_mixtral)
    eng, _ = _model(engine_dir)
    assert type(eng.model.layers[0].mlp.experts["0"].down_proj.quant_method).__name__.lower().startswith(qtype)
    ids = ckpt.load_tokenizer().encode(TEXT)
    want, _ = forward_logits(ref, ids, chunks=2)
    got, _ = forward_logits(eng, ids, chunks=2)
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err <= TOLERANCE[qtype]
