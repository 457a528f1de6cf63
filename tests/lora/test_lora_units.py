"""Adapter validation, slot assignment and the scheduler's adapter limit, without running a model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ember.core.block_manager import BlockManager
from ember.core.request import Request
from ember.core.scheduler import Scheduler
from ember.lora import AdapterError, LoRAManager, load_adapter
from ember.lora.routes import confined_adapter_dir
from ember.errors import InvalidRequestError
from ember.models.registry import get_model_class
from ember.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llama(lora_models):
    base, adapters = lora_models["llama"]
    cfg = transformers.AutoConfig.from_pretrained(base)
    model = get_model_class(cfg.architectures[0])(cfg, dtype=torch.float32, device=torch.device("cpu"))
    model.load_weights(load_file(str(base / "model.safetensors")).items())
    return model, adapters


def test_peft_names_map_onto_fused_shards(llama):
    model, adapters = llama
    a = load_adapter("x", adapters["all-r4"], model, max_lora_rank=16)
    assert a.rank == 4 and a.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"])
    qkv = a.weights["model.layers.0.self_attn.qkv_proj"]
    assert sorted(qkv) == [0, 1, 2]  # q, k, v: shards of the fused projection
    assert sorted(a.weights["model.layers.1.mlp.gate_up_proj"]) == [0, 1]
    assert list(a.weights["model.layers.0.self_attn.o_proj"]) == [None]


def test_rank_and_targets_are_limited(llama):
    model, adapters = llama
    with pytest.raises(AdapterError, match="max_lora_rank 4"):
        load_adapter("x", adapters["qv-r8"], model, max_lora_rank=4)
    with pytest.raises(AdapterError, match="lora_target_modules"):
        load_adapter("x", adapters["all-r4"], model, max_lora_rank=16, allowed_targets=["q_proj", "v_proj"])


def test_pickles_and_unsupported_adapters_are_refused(llama, tmp_path):
    model, adapters = llama
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapters["qv-r8"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter("x", pickled, model, max_lora_rank=16)
    dora = tmp_path / "dora"
    shutil.copytree(adapters["qv-r8"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter("x", dora, model, max_lora_rank=16)


def test_runtime_paths_stay_inside_the_root(tmp_path):
    (tmp_path / "a").mkdir()
    assert confined_adapter_dir(str(tmp_path), "a") == (tmp_path / "a").resolve()
    for bad in ("..", "../a", "/etc", "a/../.."):
        with pytest.raises(InvalidRequestError):
            confined_adapter_dir(str(tmp_path), bad)


def test_slots_are_packed_and_evicted_least_recently_used(llama):
    model, adapters = llama
    manager = LoRAManager(model, max_loras=2, max_lora_rank=16, target_modules=None, dtype=torch.float32,
                          device=torch.device("cpu"))
    for name, path in adapters.items():
        manager.add_adapter(name, path)
    meta = manager.prepare([("qv-r8", 2), (None, 1), ("all-r4", 3)])
    assert meta.slot_ids.tolist() == [0, 0, -1, 1, 1, 1] and meta.num_active_slots == 2
    assert meta.mask(3).shape == (6, 6)
    manager.prepare([("all-r4", 1)])  # qv-r8 is now the least recently used
    manager.prepare([("mlp-r2-rs", 1), ("all-r4", 1)])
    assert manager.slot_names == ["mlp-r2-rs", "all-r4"]
    assert manager.prepare([(None, 4)]) is None  # base-only steps touch no LoRA weights
    manager.remove_adapter("all-r4")
    assert "all-r4" not in manager.names
    manager.prepare([("mlp-r2-rs", 1)])
    assert manager.slot_names == ["mlp-r2-rs", None]
    with pytest.raises(RuntimeError, match="max_loras"):
        manager.prepare([("qv-r8", 1), ("mlp-r2-rs", 1), ("all-r4", 1)])


def test_scheduler_admits_at_most_max_loras_adapters():
    sched = Scheduler(BlockManager(64, 4, True), max_num_tokens=64, max_batch_size=8, max_seq_len=64, max_loras=2)
    params = SamplingParams(max_tokens=4)
    for i, lora in enumerate(["a", "b", "a", "c", None]):
        sched.add_request(Request(f"r{i}", [1, 2, 3], params, lora_name=lora))
    first = [s.request.request_id for s in sched.schedule().scheduled]
    assert first == ["r0", "r1", "r2"]  # r3 needs a third adapter: it waits, and r4 behind it (queue order)


def test_cli_lora_flag_adds_adapters(lora_models):
    from ember.cli import _lora_adapters
    from ember.config import load_config
    from ember.errors import ConfigError

    base, adapters = lora_models["llama"]
    cfg = load_config(str(base))
    merged = _lora_adapters(cfg, [f"mine={adapters['qv-r8']}", "hub=org/some-adapter"])
    assert merged["mine"] == {"source": "LOCAL", "repo": str(adapters["qv-r8"])}
    assert merged["hub"]["source"] == "HF"
    assert set(load_config(cfg, lora_adapters=merged).trt_llm.build.lora_adapters) == {"mine", "hub"}
    with pytest.raises(ConfigError, match="NAME=PATH"):
        _lora_adapters(cfg, ["no-equals"])
