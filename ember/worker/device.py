"""Device and dtype choice, made once from the config (`ember.device`, `ember.dtype`)."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"ember.device={name!r} but no CUDA device is available here; use 'cpu' or 'auto'")
    return dev


def has_bf16_units(device: torch.device) -> bool:
    """bf16 where the hardware computes it natively: Ampere+ GPUs, CPUs with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "", "auto"):
        if has_bf16_units(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"ember.dtype={name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]
