"""One LoRA adapter in PEFT format, read and validated against the model it will run on.

A PEFT adapter directory holds `adapter_config.json` (r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with tensors named like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]).
`load_adapter` maps them onto ember's modules: q/k/v onto row slices (shards) of `qkv_proj`, gate/up onto
shards of `gate_up_proj`, through the model's own `stacked_params`, and folds the scaling (alpha / r, or
alpha / sqrt(r) for rsLoRA) into B, so the forward pass is `y += (x @ A^T) @ B^T`.

Only safetensors are read (never pickle: `adapter_model.bin` is refused), and only from the directory the
config names. What ember cannot apply exactly (DoRA, trained biases, modules_to_save, embedding or
lm_head targets) is refused with a one-line error naming the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.layers.linear import Linear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")  # optional PEFT adapter name


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the adapter and the field."""


@dataclass
class LoRAAdapter:
    """An adapter's weights on the host, keyed by ember module path.

    weights[module path][shard] = (A [r, in], B [shard_out, r] with the scaling folded in); shard None
    means the module's whole output (an unfused module, or an already-fused one such as Phi-3's qkv_proj).
    """

    name: str
    path: Path
    rank: int  # the largest rank of any module
    target_modules: list[str]  # short names as PEFT targets them (q_proj, v_proj, ...)
    weights: dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor]]] = field(repr=False, default_factory=dict)


def resolve_adapter_dir(repo) -> Path:
    """Directory of an adapter named by a config `CheckpointRepository` (LOCAL path or HF cache, offline)."""
    source = str(getattr(repo, "source", "LOCAL")).upper()
    if source == "LOCAL":
        path = Path(repo.repo).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"LoRA adapter {repo.repo}: not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
        return path
    if source != "HF":
        raise AdapterError(f"LoRA adapter {repo.repo}: source {source} is not supported here; use HF (cache) or LOCAL")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo.repo, revision=repo.revision, local_files_only=True))
    except Exception as exc:  # not cached: there is no network here
        raise FileNotFoundError(f"LoRA adapter {repo.repo} is not in the local Hugging Face cache and there is no "
                                f"network here; use source: LOCAL ({type(exc).__name__})") from None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name it ends with (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(path: Path, name: str) -> dict:
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise AdapterError(f"LoRA adapter {name!r}: {path} has no {CONFIG_FILE}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise AdapterError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not valid JSON ({e})") from None
    checks = [
        (str(cfg.get("peft_type", "LORA")).upper() == "LORA", "peft_type", "only LORA adapters are supported"),
        (not cfg.get("use_dora"), "use_dora", "DoRA adapters are not supported"),
        (cfg.get("bias", "none") == "none", "bias", "adapters that train biases are not supported"),
        (not cfg.get("modules_to_save"), "modules_to_save", "adapters with fully trained modules are not supported"),
        (not cfg.get("fan_in_fan_out"), "fan_in_fan_out", "fan_in_fan_out (Conv1D) adapters are not supported"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise AdapterError(f"LoRA adapter {name!r}: {CONFIG_FILE} {key}={cfg.get(key)!r}: {why}")
    return cfg


def load_adapter(name: str, path: Path, model, *, max_lora_rank: int, allowed_targets: list[str] | None = None,
                 dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Read and validate the adapter in `path` for `model` (an ember CausalLM); tensors stay on the host."""
    from safetensors import safe_open

    path = Path(path)
    cfg = read_adapter_config(path, name)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        extra = " (adapter_model.bin is a pickle and is never loaded; convert it to safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"LoRA adapter {name!r}: {path} has no {WEIGHTS_FILE}{extra}")
    default_r, default_alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    use_rslora = bool(cfg.get("use_rslora", False))
    pairs: dict[str, dict[str, torch.Tensor]] = {}  # PEFT module name -> {"A": ..., "B": ...}
    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():
            hf = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            m = _TENSOR.match(hf)
            if m is None:
                raise AdapterError(f"LoRA adapter {name!r}: tensor {key} is not a LoRA A/B weight "
                                   "(embedding, bias and DoRA tensors are not supported)")
            pairs.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    if not pairs:
        raise AdapterError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} holds no LoRA tensors")
    adapter = LoRAAdapter(name, path, 0, [])
    targets: set[str] = set()
    for module_name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"LoRA adapter {name!r}: module {module_name} lacks lora_{'B' if 'A' in ab else 'A'}")
        short = module_name.rsplit(".", 1)[-1]
        if allowed_targets and short not in allowed_targets:
            raise AdapterError(f"LoRA adapter {name!r} targets {short}, which is not in "
                               f"lora_configuration.lora_target_modules ({', '.join(allowed_targets)})")
        mapped, shard = model._map_name(module_name + ".weight")
        ember_path = mapped[: -len(".weight")]
        try:
            layer = model.get_submodule(ember_path)
        except AttributeError:
            layer = None
        if not isinstance(layer, Linear) or ember_path == "lm_head":
            raise AdapterError(f"LoRA adapter {name!r}: target {module_name} is not a linear layer of "
                               f"{type(model).__name__} that LoRA can apply to")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if r > max_lora_rank:
            raise AdapterError(f"LoRA adapter {name!r}: rank {r} of {module_name} is above "
                               f"lora_configuration.max_lora_rank {max_lora_rank}")
        out = layer.out_features if shard is None else layer.output_sizes[shard]
        if tuple(a.shape) != (r, layer.in_features) or tuple(b.shape) != (out, r):
            raise AdapterError(f"LoRA adapter {name!r}: {module_name} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                               f"the model needs A [r, {layer.in_features}], B [{out}, r]")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module_name, default_alpha))
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        adapter.weights.setdefault(ember_path, {})[shard] = (a.to(dtype), (b.float() * scale).to(dtype))
        adapter.rank = max(adapter.rank, r)
        targets.add(short)
    adapter.target_modules = sorted(targets)
    return adapter
