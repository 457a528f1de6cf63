"""ember's multi-LoRA against peft's merged models: logits per adapter in one mixed forward pass, and greedy
tokens through the engine with three adapters and the base model in one batch."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ember.layers.attention import build_attention_metadata
from ember.lora import LoRAManager
from ember.models.registry import get_model_class
from ember.worker.kv_cache import allocate_kv_caches

from .conftest import lora_config, merged_reference

MIX = ["all-r4", None, "qv-r8", "mlp-r2-rs"]  # one request per entry, all in one batch


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randrange(5, 12))] for _ in range(n)]


def _ember_model(base):
    cfg = transformers.AutoConfig.from_pretrained(base)
    model = get_model_class(cfg.architectures[0])(cfg, dtype=torch.float32, device=torch.device("cpu"))
    model.load_weights(load_file(str(base / "model.safetensors")).items())
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_mixed_batch_logits_match_peft_merged(lora_models, kind):
    base, adapters = lora_models[kind]
    model = _ember_model(base)
    manager = LoRAManager(model, max_loras=4, max_lora_rank=16, target_modules=None, dtype=torch.float32,
                          device=torch.device("cpu"))
    for name, path in adapters.items():
        manager.add_adapter(name, path)
    prompts = _prompts(len(MIX))
    block_size, tables, ids, pos = 4, [], [], []
    next_block = 1
    for p in prompts:
        n = -(-len(p) // block_size)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
        ids += p
        pos += range(len(p))
    kv = allocate_kv_caches(model.num_layers, next_block, block_size, model.num_kv_heads, model.head_dim,
                            torch.float32, "cpu")
    meta = build_attention_metadata([len(p) for p in prompts], [len(p) for p in prompts], tables, block_size, "cpu")
    meta.lora = manager.prepare([(name, len(p)) for name, p in zip(MIX, prompts)])
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor(ids), torch.tensor(pos), kv, meta))  # [T, V]
    start = 0
    base_ref = merged_reference(base, None)
    for name, p in zip(MIX, prompts):
        ours = logits[start:start + len(p)]
        start += len(p)
        with torch.no_grad():
            ref = merged_reference(base, adapters[name] if name else None)(torch.tensor([p])).logits[0]
            plain = base_ref(torch.tensor([p])).logits[0]
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4, msg=f"adapter {name}")
        if name is not None:  # the adapter really changes the output
            assert (ref - plain).abs().max() > 1e-2


@pytest.mark.parametrize("kind,max_loras,segmented", [("llama", 4, False), ("qwen2", 2, False), ("qwen2", 4, True)])
def test_engine_greedy_tokens_match_peft_merged(lora_models, kind, max_loras, segmented, monkeypatch):
    """Three adapters and the base model in one batch; with max_loras=2 the scheduler holds the third adapter's
    request back until a slot frees, and the manager evicts the least recently used adapter. `segmented`: every
    step takes the per-adapter segmented path that prefill-sized steps take (these prompts are short)."""
    from ember import LLM, SamplingParams
    from ember.lora import manager as lora_manager

    if segmented:
        monkeypatch.setattr(lora_manager, "SEGMENT_MIN_TOKENS_PER_SLOT", 1)

    base, adapters = lora_models[kind]
    llm = LLM(lora_config(base, adapters, max_loras=max_loras))
    prompts = _prompts(len(MIX), seed=1) * 2
    names = MIX * 2
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), lora_name=names)
    refs = {name: merged_reference(base, adapters[name] if name else None) for name in set(MIX)}

    def greedy(model, p):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.int64),
                                 max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        return ref[0, len(p):].tolist()

    changed = set()
    for p, name, out in zip(prompts, names, outs):
        ref = greedy(refs[name], p)
        assert out.token_ids == ref, f"adapter {name}"
        if name is not None and ref != greedy(refs[None], p):
            changed.add(name)
    # the check can fail: with qwen2 every adapter changes its prompt's greedy tokens (llama's tied, peaky head
    # leaves two of them unchanged; the logits test above covers those)
    assert changed == (set(MIX) - {None} if kind == "qwen2" else {"all-r4"})
    manager = llm.engine.runner.lora_manager
    assert len(manager.slot_names) == max_loras
    assert manager.num_slot_loads >= 3  # with 2 slots, 3 adapters mean at least one eviction


def test_prefix_cache_never_shared_across_adapters(lora_models):
    from ember import LLM, SamplingParams

    base, adapters = lora_models["llama"]
    llm = LLM(lora_config(base, adapters))
    prompt = _prompts(1, seed=2)[0] * 5  # several full blocks
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    first = llm.generate([prompt], params, lora_name="all-r4")[0]
    same = llm.generate([prompt], params, lora_name="all-r4")[0]
    other = llm.generate([prompt], params, lora_name="qv-r8")[0]
    plain = llm.generate([prompt], params)[0]
    assert first.num_cached_tokens == 0
    assert same.num_cached_tokens > 0  # the same adapter does hit its own blocks
    assert other.num_cached_tokens == 0 and plain.num_cached_tokens == 0
