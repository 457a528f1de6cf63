"""LoRAManager: the adapters an engine serves, the device slots that hold them, and each step's mapping.

All adapters live on the host (validated at load); `max_loras` slots of every targeted Linear's stacked A/B
live on the device (`LoRALinear`). Each step the runner calls `prepare` with the scheduled requests' adapter
names: adapters not in a slot are copied into a free one, else into the least recently used slot that this
step does not need, and it returns the token -> slot mapping (`LoRABatchMetadata`), which the runner puts in
the forward's metadata for every LoRA layer to read (nothing is left set on the manager between steps).
The scheduler admits at most `max_loras` distinct adapters into the running set, so a step always fits.

Adapters added or removed at run time (from the server's thread) are queued and applied at the start of the
next `prepare`, on the engine's thread, so a forward pass never sees its weights change.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from ember.layers.linear import Linear
from ember.lora.adapter import AdapterError, LoRAAdapter, load_adapter, resolve_adapter_dir
from ember.lora.layer import LoRABatchMetadata, LoRALinear

logger = logging.getLogger(__name__)

# A step with at least this many tokens per adapter in it takes the segmented path (each adapter's tokens through
# its own A and B only) rather than the masked one (every token through every active slot): see ember.lora.layer.
SEGMENT_MIN_TOKENS_PER_SLOT = 64


class LoRAManager:
    """Serves adapters from `max_loras` device slots; `prepare` maps a step's tokens to them."""

    def __init__(self, model, *, max_loras: int, max_lora_rank: int, target_modules: list[str] | None,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.max_loras = max_loras  # device slots, and distinct adapters per step
        self.max_lora_rank = max_lora_rank
        self.target_modules = list(target_modules or [])  # empty: whatever the adapters target
        self.dtype, self.device = dtype, torch.device(device)
        self.adapters: dict[str, LoRAAdapter] = {}  # applied on the engine thread
        self.layers: dict[str, LoRALinear] = {}  # module path -> its slots
        self.rank = 0  # rank the slots are padded to: the largest adapter's
        self.slot_names: list[str | None] = [None] * max_loras
        self.slot_last_used: list[int] = [0] * max_loras
        self.num_steps = 0
        self.num_slot_loads = 0  # adapters copied into a slot (first use or after eviction)
        self._names: list[str] = []  # what requests may name now (includes queued adds, excludes queued removals)
        self._pending: list[tuple[str, str, LoRAAdapter | None]] = []  # ("add"|"remove", name, adapter)
        self._lock = threading.Lock()

    # ---- adapters -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._names)

    def read_adapter(self, name: str, path: Path) -> LoRAAdapter:
        return load_adapter(name, path, self.model, max_lora_rank=self.max_lora_rank,
                            allowed_targets=self.target_modules or None, dtype=self.dtype)

    def add_adapter(self, name: str, path: Path) -> LoRAAdapter:
        """Read and validate an adapter (on the caller's thread) and queue it for the engine."""
        with self._lock:
            if name in self._names:
                raise AdapterError(f"LoRA adapter {name!r} is already loaded")
        adapter = self.read_adapter(name, path)
        with self._lock:
            if name in self._names:
                raise AdapterError(f"LoRA adapter {name!r} is already loaded")
            self._pending.append(("add", name, adapter))
            self._names.append(name)
        return adapter

    def remove_adapter(self, name: str) -> None:
        """New requests can no longer name it; it leaves its slot at the first step that does not use it."""
        with self._lock:
            if name not in self._names:
                raise AdapterError(f"LoRA adapter {name!r} is not loaded")
            self._names.remove(name)
            self._pending.append(("remove", name, None))

    def _apply_pending(self, in_use: set[str]) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for i, (op, name, adapter) in enumerate(pending):
            if op == "add":
                self._register(adapter)
            elif name in in_use:  # still running requests: retry next step
                with self._lock:
                    self._pending[:0] = pending[i:]
                return
            elif name in self.slot_names:
                # The host copy stays: a request that named it before the removal may still be queued.
                self.slot_names[self.slot_names.index(name)] = None

    def _register(self, adapter: LoRAAdapter) -> None:
        self.adapters[adapter.name] = adapter
        if adapter.name in self.slot_names:  # re-loaded under the same name: the slot holds the old weights
            self.slot_names[self.slot_names.index(adapter.name)] = None
        if adapter.rank > self.rank:  # wider slots everywhere: rebuild, and reload slots lazily
            self.rank = adapter.rank
            for path in sorted(set(self.layers) | set(adapter.weights)):
                self._attach(path)
            self.slot_names = [None] * self.max_loras
            return
        for path in adapter.weights:
            if path not in self.layers:  # no loaded adapter targets it: zero slots are right for them
                self._attach(path)

    def _attach(self, path: str) -> None:
        linear = self.model.get_submodule(path)
        assert isinstance(linear, Linear)
        layer = LoRALinear(linear, self.max_loras, self.rank, self.dtype, self.device)
        self.layers[path] = layer
        linear.lora = layer

    # ---- one step -------------------------------------------------------------------------------
    def prepare(self, items: list[tuple[str | None, int]]) -> LoRABatchMetadata | None:
        """items: (adapter name or None, number of tokens) per scheduled request, in the batch's token order."""
        names = list(dict.fromkeys(n for n, _ in items if n is not None))
        if self._pending:
            self._apply_pending(set(names))
        self.num_steps += 1
        if not names:
            return None
        if len(names) > self.max_loras:
            raise RuntimeError(f"{len(names)} LoRA adapters in one step, above max_loras {self.max_loras}")
        for name in names:
            if name not in self.slot_names:
                self._load_slot(self._pick_slot(names), name)
            self.slot_last_used[self.slot_names.index(name)] = self.num_steps
        slot_of = {name: self.slot_names.index(name) for name in names}
        slots = [slot_of[n] if n is not None else -1 for n, _ in items]
        counts = torch.tensor([c for _, c in items], dtype=torch.int64)
        slot_ids = torch.repeat_interleave(torch.tensor(slots, dtype=torch.int64), counts)  # [T]
        num_active = max(slot_of.values()) + 1
        single = num_active == 1 and -1 not in slots
        segments = None
        if len(slot_ids) >= SEGMENT_MIN_TOKENS_PER_SLOT * len(names):
            segments = self._segments(slots, [c for _, c in items])
        return LoRABatchMetadata(slot_ids.to(self.device, non_blocking=True), num_active, single, self.dtype, segments)

    def _segments(self, slots: list[int], counts: list[int]) -> list[tuple[int, slice | torch.Tensor]]:
        """Each adapter slot's token rows: a slice when its requests sit together in the batch, else indices."""
        runs: dict[int, list[tuple[int, int]]] = {}
        start = 0
        for slot, count in zip(slots, counts):
            if slot >= 0 and count:
                spans = runs.setdefault(slot, [])
                if spans and spans[-1][1] == start:
                    spans[-1] = (spans[-1][0], start + count)
                else:
                    spans.append((start, start + count))
            start += count
        out = []
        for slot, spans in sorted(runs.items()):
            if len(spans) == 1:
                out.append((slot, slice(*spans[0])))
            else:
                idx = torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in spans])
                out.append((slot, idx.to(self.device, non_blocking=True)))
        return out

    def _pick_slot(self, needed: list[str]) -> int:
        """An empty slot (lowest first, so a step's slots stay packed low), else the least recently used one
        that this step does not need."""
        candidates = [i for i, n in enumerate(self.slot_names) if n not in needed]
        empty = [i for i in candidates if self.slot_names[i] is None]
        if empty:
            return empty[0]
        return min(candidates, key=lambda i: self.slot_last_used[i])

    def _load_slot(self, slot: int, name: str) -> None:
        adapter = self.adapters[name]
        for path, layer in self.layers.items():
            layer.load_slot(slot, adapter.weights.get(path))
        self.slot_names[slot] = name
        self.num_slot_loads += 1


def build_lora_manager(cfg, model, dtype: torch.dtype, device: torch.device) -> LoRAManager | None:
    """The manager for `build.lora_adapters` (None when the config serves no adapters)."""
    build = cfg.trt_llm.build
    if not build.lora_adapters and not getattr(cfg.ember, "lora_runtime_dir", None):
        return None
    if build.tensor_parallel_count > 1:  # the slots would need the Linears' column/row sharding
        raise AdapterError("trt_llm.build.lora_adapters: LoRA with tensor_parallel_count > 1 is not supported yet; "
                           "use tensor_parallel_count: 1")
    lora_cfg = build.lora_configuration
    manager = LoRAManager(model, max_loras=cfg.ember.max_loras,
                          max_lora_rank=lora_cfg.max_lora_rank if lora_cfg else 64,
                          target_modules=lora_cfg.lora_target_modules if lora_cfg else None,
                          dtype=dtype, device=device)
    for name, repo in (build.lora_adapters or {}).items():
        adapter = manager.add_adapter(name, resolve_adapter_dir(repo))
        logger.info("LoRA adapter %s: rank %d on %s (%s)", name, adapter.rank, ", ".join(adapter.target_modules),
                    adapter.path)
    manager.prepare([])  # register them now, not on the first step
    return manager
