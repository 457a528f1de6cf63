"""The three ways a LoRA layer applies a mixed batch's delta (masked, oneDNN-packed bf16, segmented per adapter)
against a per-token float64 reference, and the manager's choice between them."""

from __future__ import annotations

import pytest
import torch

from ember.layers.cpu_pack import can_pack
from ember.layers.linear import Linear
from ember.lora.layer import LoRABatchMetadata, LoRALinear, slot_bucket
from ember.lora.manager import SEGMENT_MIN_TOKENS_PER_SLOT, LoRAManager

IN, OUTS, RANK, SLOTS = 48, [40, 24, 24], 4, 4  # a fused q|k|v-like layer: three shards


def _layer(dtype: torch.dtype, seed: int = 0) -> tuple[LoRALinear, dict[int, dict]]:
    """A LoRA layer whose slots 0..2 hold random adapters (slot 1 targets only shards 0 and 2, with rank 2)."""
    linear = Linear(IN, OUTS, dtype=dtype)
    layer = LoRALinear(linear, SLOTS, RANK, dtype, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for slot, (shards, r) in enumerate([([0, 1, 2], RANK), ([0, 2], 2), ([0, 1, 2], RANK)]):
        weights[slot] = {k: (torch.randn(r, IN, generator=gen), torch.randn(OUTS[k], r, generator=gen) * 0.1)
                         for k in shards}
        layer.load_slot(slot, {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in weights[slot].items()})
    return layer, weights


def _reference(x: torch.Tensor, y: torch.Tensor, slot_ids: list[int], weights: dict[int, dict]) -> torch.Tensor:
    """y + per token: its adapter's x A_k^T B_k^T for every shard k, in float64 (the layer's weights rounded alike)."""
    out = y.double().clone()
    for t, slot in enumerate(slot_ids):
        if slot < 0:
            continue
        col = 0
        for k, size in enumerate(OUTS):
            if k in weights[slot]:
                a, b = (w.to(x.dtype).double() for w in weights[slot][k])
                out[t, col:col + size] += (x[t].double() @ a.t()) @ b.t()
            col += size
    return out


def _meta(slot_ids: list[int], dtype: torch.dtype, segments=None) -> LoRABatchMetadata:
    active = max(slot_ids) + 1
    return LoRABatchMetadata(torch.tensor(slot_ids), active, active == 1 and -1 not in slot_ids, dtype, segments)


def _segments(slot_ids: list[int], contiguous: bool):
    out = []
    for slot in sorted(set(s for s in slot_ids if s >= 0)):
        rows = [i for i, s in enumerate(slot_ids) if s == slot]
        out.append((slot, slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows)))
    return out


MIXED = [0, -1, 2, 1, 1, 0, -1, 2, 2, 0]
GROUPED = [0, 0, 0, -1, -1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("case", ["masked", "segments-sliced", "segments-indexed", "single-slot"])
def test_float32_paths_match_reference(case):
    layer, weights = _layer(torch.float32)
    slot_ids = {"masked": MIXED, "segments-sliced": GROUPED, "segments-indexed": MIXED,
                "single-slot": [0] * 6}[case]
    segments = None
    if case.startswith("segments"):
        segments = _segments(slot_ids, contiguous=case == "segments-sliced")
    meta = _meta(slot_ids, torch.float32, segments)
    x, y = torch.randn(len(slot_ids), IN), torch.randn(len(slot_ids), sum(OUTS))
    out = layer.apply(x, y.clone(), meta)
    torch.testing.assert_close(out.double(), _reference(x, y, slot_ids, weights), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="this CPU has no oneDNN bf16 matmul")
@pytest.mark.parametrize("slot_ids", [MIXED, [0] * 5, [0, -1, 0], [1, 0, -1, 1]])
def test_packed_bf16_path_matches_reference(slot_ids):
    layer, weights = _layer(torch.bfloat16)
    assert layer.is_packed
    meta = _meta(slot_ids, torch.bfloat16)
    x, y = torch.randn(len(slot_ids), IN, dtype=torch.bfloat16), torch.randn(len(slot_ids), sum(OUTS), dtype=torch.bfloat16)
    out = layer.apply(x, y.clone(), meta)
    ref = _reference(x, y, slot_ids, weights)
    assert out.dtype == torch.bfloat16 and out.shape == y.shape
    torch.testing.assert_close(out.double(), ref, atol=0.05, rtol=0.02)  # bf16 output rounding
    # a reloaded slot is repacked: the next step sees the new weights, not the stale packed copy
    new = {0: (torch.randn(RANK, IN), torch.randn(OUTS[0], RANK))}
    layer.load_slot(0, {k: (a.bfloat16(), b.bfloat16()) for k, (a, b) in new.items()})
    weights[0] = new
    torch.testing.assert_close(layer.apply(x, y.clone(), meta).double(), _reference(x, y, slot_ids, weights),
                               atol=0.05, rtol=0.02)


def test_slot_buckets_are_powers_of_two_up_to_all_slots():
    assert [slot_bucket(n, 4) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert [slot_bucket(n, 6) for n in (1, 3, 5, 6)] == [1, 4, 6, 6]


def test_manager_segments_large_steps_only(lora_models):
    import transformers
    from safetensors.torch import load_file

    from ember.models.registry import get_model_class

    base, adapters = lora_models["llama"]
    cfg = transformers.AutoConfig.from_pretrained(base)
    model = get_model_class(cfg.architectures[0])(cfg, dtype=torch.float32, device=torch.device("cpu"))
    model.load_weights(load_file(str(base / "model.safetensors")).items())
    manager = LoRAManager(model, max_loras=4, max_lora_rank=16, target_modules=None, dtype=torch.float32,
                          device=torch.device("cpu"))
    for name, path in adapters.items():
        manager.add_adapter(name, path)
    n = SEGMENT_MIN_TOKENS_PER_SLOT
    assert not manager.prepare([("qv-r8", 3), (None, 2), ("all-r4", 1)]).use_segments  # decode-sized: masked
    meta = manager.prepare([("qv-r8", n), (None, 5), ("all-r4", n), ("qv-r8", 7)])
    assert meta.use_segments
    (s0, rows0), (s1, rows1) = meta.segments
    assert (s0, s1) == (0, 1)
    assert rows0.tolist() == list(range(n)) + list(range(2 * n + 5, 2 * n + 12))  # two runs: gathered
    assert rows1 == slice(n + 5, 2 * n + 5)  # one run: a slice
