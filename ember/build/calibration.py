"""Calibration: run the unquantized model over calibration text and record the absolute maxima that set
static scales: each quantized Linear's input (fp8 activation scales) and each layer's K and V (fp8 KV
cache scales).

`quantization_config.calib_dataset` is a local .txt file (documents separated by blank lines), a local
.jsonl file (one document per line: its "text", "content" or "prompt" field, or "messages"), or a built-in
set name (`ember-mix`, the default). A Hugging Face dataset id cannot be fetched here (no network).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ember.build.calib_data import BUILTIN_SETS, DEFAULT_CALIBRATION_SET
from ember.errors import ConfigError
from ember.layers.attention import build_attention_metadata
from ember.layers.linear import Linear
from ember.worker.kv_cache import allocate_kv_caches

FIELD = "trt_llm.build.quantization_config.calib_dataset"


class BuildError(ConfigError):
    """The config asks for something this model or host cannot be built with; the message names the field."""


def load_texts(dataset: str | None) -> list[str]:
    """The documents of a calibration (or evaluation) set; see the module docstring for what `dataset` may be."""
    name = dataset or DEFAULT_CALIBRATION_SET
    if name in BUILTIN_SETS:
        return list(BUILTIN_SETS[name])
    path = Path(name).expanduser()
    if not path.exists():
        raise BuildError(
            f"{FIELD}: {name!r} is neither a local .txt/.jsonl file nor a built-in set ({', '.join(BUILTIN_SETS)}); "
            "Hugging Face datasets cannot be downloaded here (no network access)")
    if path.suffix == ".txt":
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
    elif path.suffix == ".jsonl":
        docs = [_jsonl_text(line, path, i) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                if line.strip()]
    else:
        raise BuildError(f"{FIELD}: {name!r} is a {path.suffix or 'suffix-less'} file; use a .txt or .jsonl file")
    docs = [d for d in docs if d]
    if not docs:
        raise BuildError(f"{FIELD}: {name!r} holds no text")
    return docs


def _jsonl_text(line: str, path: Path, lineno: int) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BuildError(f"{FIELD}: {path} line {lineno} is not valid JSON ({e.msg})") from None
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        for key in ("text", "content", "prompt"):
            if isinstance(row.get(key), str):
                return row[key] + (row.get("completion") or "" if key == "prompt" else "")
        if isinstance(row.get("messages"), list):
            return "\n".join(str(m.get("content", "")) for m in row["messages"] if isinstance(m, dict))
    raise BuildError(f"{FIELD}: {path} line {lineno} has no \"text\", \"content\", \"prompt\" or \"messages\" field")


def tokenize_samples(tokenizer, texts: list[str], max_samples: int, max_len: int) -> list[list[int]]:
    """One sample per document (at least 2 tokens), truncated to max_len tokens, at most max_samples of them."""
    samples = []
    for text in texts[:max_samples]:
        ids = tokenizer.encode(text, add_special_tokens=False)[:max_len]
        if len(ids) >= 2:
            samples.append(ids)
    return samples


@torch.no_grad()
def forward_logits(model, token_ids: list[int], *, chunks: int = 1, block_size: int = 16):
    """Run one sequence through `model` over a fresh paged KV cache -> (logits [T, V] float32, kv_caches).

    chunks > 1 prefills the sequence in that many pieces, so later pieces read earlier K/V back from the
    cache (exercising a quantized cache as serving does)."""
    n = len(token_ids)
    num_blocks = -(-n // block_size)
    kv_caches = allocate_kv_caches(model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim,
                                   model.kv_cache_dtype or model.dtype, model.device)
    bounds = sorted({0, n, *(n * i // chunks for i in range(1, chunks))})
    logits = []
    for start, end in zip(bounds, bounds[1:]):
        ids = torch.tensor(token_ids[start:end], dtype=torch.int64, device=model.device)  # [L]
        pos = torch.arange(start, end, dtype=torch.int64, device=model.device)  # [L]
        meta = build_attention_metadata([end - start], [end], [list(range(num_blocks))], block_size, model.device)
        logits.append(model.compute_logits(model(ids, pos, kv_caches, meta)))  # [L, V]
    return torch.cat(logits), kv_caches


@dataclass
class CalibrationOutput:
    """Absolute maxima seen over the calibration samples."""

    input_amax: dict[str, float] = field(default_factory=dict)  # Linear path -> max |input|
    kv_amax: dict[str, tuple[float, float]] = field(default_factory=dict)  # attention path -> (max |K|, max |V|)
    num_samples: int = 0
    num_tokens: int = 0


@torch.no_grad()
def calibrate(model, samples: list[list[int]], linear_paths: list[str], attention_paths: list[str],
              progress: bool = True) -> CalibrationOutput:
    """Record input absmax of the Linears at `linear_paths` and K/V absmax of each layer (in `attention_paths`
    order, one per KV cache) while the unquantized `model` reads `samples`."""
    out = CalibrationOutput()
    hooks = []
    for path in linear_paths:
        def hook(module: Linear, args, path=path):
            amax = float(args[0].detach().abs().max())
            out.input_amax[path] = max(out.input_amax.get(path, 0.0), amax)
        hooks.append(model.get_submodule(path).register_forward_pre_hook(hook))
    try:
        for ids in tqdm(samples, desc="calibrating", unit="sample", disable=not progress):
            _, kv_caches = forward_logits(model, ids)
            for path, kv in zip(attention_paths, kv_caches):  # kv [2, blocks, block_size, Hk, D]
                k_amax, v_amax = float(kv[0].abs().max()), float(kv[1].abs().max())
                old = out.kv_amax.get(path, (0.0, 0.0))
                out.kv_amax[path] = (max(old[0], k_amax), max(old[1], v_amax))
            out.num_samples += 1
            out.num_tokens += len(ids)
    finally:
        for h in hooks:
            h.remove()
    return out
