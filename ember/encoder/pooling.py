"""How an encoder's per-token hidden states become one vector per sequence.

`PoolingConfig` is read once from the checkpoint: sentence-transformers' `modules.json` (which modules run:
Transformer, Pooling, Normalize) and `1_Pooling/config.json` (which pooling mode) when present, else the
config's `ember.pooling` / `ember.normalize`, else the family's default (BERT: CLS, causal: last token).
`pool()` works on a packed batch: sequences' tokens side by side, `[T, H]`, with their lengths."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

POOLING_MODES = ("cls", "mean", "last", "max")
# 1_Pooling/config.json flag -> our mode
_ST_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_max_tokens": "max",
}
_ST_UNSUPPORTED = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


@dataclass(frozen=True)
class PoolingConfig:
    """Which tokens make the embedding, and whether it is L2-normalized."""

    mode: str  # one of POOLING_MODES
    normalize: bool
    source: str  # where it came from, for the start-up log: "modules.json", "config" or "default"


def read_pooling_config(path: Path, is_causal: bool, mode: str | None = None, normalize: bool | None = None) -> PoolingConfig:
    """The checkpoint's pooling (sentence-transformers files), else `mode`/`normalize` from the config, else defaults.
    A config value given explicitly wins over the checkpoint's, so a user can override a sentence-transformers model."""
    modules = _read_json(path / "modules.json") if path.is_dir() else None
    st_mode, st_normalize = None, None
    if isinstance(modules, list):
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        unknown = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
        if unknown:
            raise ValueError(f"{path / 'modules.json'}: sentence-transformers modules {unknown} are not supported; "
                             "ember runs Transformer, Pooling and Normalize")
        st_normalize = "Normalize" in kinds
        pooling = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
        if pooling is not None:
            st_mode = _st_pooling_mode(path / str(pooling.get("path", "1_Pooling")) / "config.json")
    if mode is not None or normalize is not None:
        return PoolingConfig(mode or st_mode or ("last" if is_causal else "cls"),
                             st_normalize if normalize is None and st_normalize is not None else
                             (True if normalize is None else bool(normalize)), "config")
    if st_mode is not None:
        return PoolingConfig(st_mode, bool(st_normalize), "modules.json")
    return PoolingConfig("last" if is_causal else "cls", True if st_normalize is None else st_normalize, "default")


def _st_pooling_mode(config_path: Path) -> str:
    cfg = _read_json(config_path) or {}
    named = cfg.get("pooling_mode")  # sentence-transformers >= 6 writes one name instead of flags
    if isinstance(named, str):
        mode = {"cls": "cls", "cls_token": "cls", "mean": "mean", "mean_tokens": "mean", "max": "max", "max_tokens": "max",
                "lasttoken": "last", "last": "last"}.get(named)
        if mode is None:
            raise ValueError(f"{config_path}: pooling_mode {named!r} is not supported; ember pools with cls, mean, max or lasttoken")
        cfg = {"include_prompt": cfg.get("include_prompt"), next(f for f, m in _ST_FLAGS.items() if m == mode): True}
    on = [mode for flag, mode in _ST_FLAGS.items() if cfg.get(flag)]
    bad = [flag for flag in _ST_UNSUPPORTED if cfg.get(flag)]
    if bad or len(on) != 1:
        raise ValueError(f"{config_path}: ember pools with exactly one of {', '.join(_ST_FLAGS)}; found "
                         f"{', '.join(bad + [f for f in _ST_FLAGS if cfg.get(f)]) or 'none'}")
    if cfg.get("include_prompt") is False:
        raise ValueError(f"{config_path}: include_prompt false (instruction-excluded pooling) is not supported")
    return on[0]


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def pool(hidden: torch.Tensor, seq_lens: list[int], mode: str) -> torch.Tensor:
    """hidden [T, H] (sequences packed in order, lengths seq_lens) -> [B, H] float32."""
    if mode in ("cls", "last"):
        ends = torch.tensor(seq_lens, device=hidden.device).cumsum(0)  # [B]
        return hidden[ends - torch.tensor(seq_lens, device=hidden.device) if mode == "cls" else ends - 1].float()
    if mode not in ("mean", "max"):
        raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")
    if min(seq_lens) == max(seq_lens):  # equal lengths: one view
        h = hidden.view(len(seq_lens), seq_lens[0], hidden.shape[1]).float()  # [B, L, H]
        return h.mean(1) if mode == "mean" else h.amax(1)
    parts = torch.split(hidden, seq_lens)  # B views [L_i, H]
    return torch.stack([p.float().mean(0) if mode == "mean" else p.float().amax(0) for p in parts])


def finish_embeddings(pooled: torch.Tensor, normalize: bool) -> torch.Tensor:
    """[B, H] float32 -> the served embeddings (L2-normalized when the model says so)."""
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled
