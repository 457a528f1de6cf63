"""Rotary position embeddings (neox / rotate-half layout), cos/sin computed once and indexed by position.

Supported `rope_type`s: default, linear, llama3, yarn, longrope (alias su); `partial_rotary_factor` rotates
only the first `rotary_dim` dims of each head. The model calls `cos_sin(positions, metadata)` once per
forward pass and each layer calls `apply(x, cos, sin)` on its q|k heads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_parameters(hf_config) -> dict[str, Any]:
    """The rope settings of an HF config as one flat dict (transformers 5 `rope_parameters` or old `rope_scaling`)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] == "su":
        params["rope_type"] = "longrope"
    params.setdefault("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0)
    if "original_max_position_embeddings" not in params and hasattr(hf_config, "original_max_position_embeddings"):
        params["original_max_position_embeddings"] = hf_config.original_max_position_embeddings
    return params


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [dim / 2]


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, p: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attn_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn_factor)


def _cos_sin(inv_freq: torch.Tensor, num_positions: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin tables `[num_positions, rotary_dim]` in float32."""
    freqs = torch.outer(torch.arange(num_positions, dtype=torch.float32), inv_freq)  # [P, R/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [P, R]
    cos, sin = emb.cos() * scale, emb.sin() * scale
    half = inv_freq.numel()
    # rotate_half(x) * sin == roll(x, R/2) * [-sin_lo, sin_hi]: fold the sign into the table.
    sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    return cos, sin


class RotaryEmbedding(nn.Module):
    """Precomputed rotary tables for one model; shared by all its layers."""

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any], *, dtype, device):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.rope_type = params["rope_type"]
        base, dim = float(params["rope_theta"]), self.rotary_dim
        self.long_offset = 0  # longrope: positions of long sequences index the table from here
        scale = 1.0
        if self.rope_type == "default":
            inv_freq = _base_inv_freq(base, dim)
        elif self.rope_type == "linear":
            inv_freq = _base_inv_freq(base, dim) / params["factor"]
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(_base_inv_freq(base, dim), params)
        elif self.rope_type == "yarn":
            inv_freq, scale = _yarn_inv_freq(base, dim, params, max_position)
        elif self.rope_type == "longrope":
            inv_freq = None
        else:
            raise ValueError(
                f"rope_type {self.rope_type!r} is not supported; supported: default, linear, llama3, yarn, longrope"
            )
        if inv_freq is not None:
            cos, sin = _cos_sin(inv_freq, max_position, scale)
        else:
            orig = params["original_max_position_embeddings"]
            factor = params.get("factor") or max_position / orig
            scale = params.get("attention_factor")
            if scale is None:
                scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
            shape = _base_inv_freq(base, dim).reciprocal()  # base ** (2i / dim)
            short_inv = 1.0 / (torch.tensor(params["short_factor"], dtype=torch.float32) * shape)
            long_inv = 1.0 / (torch.tensor(params["long_factor"], dtype=torch.float32) * shape)
            # Like HF: a sequence longer than `orig` uses the long factors, else the short ones.
            # Table = [short for positions 0..orig-1 | long for positions 0..max_position-1].
            cos_s, sin_s = _cos_sin(short_inv, orig, scale)
            cos_l, sin_l = _cos_sin(long_inv, max(max_position, orig + 1), scale)
            cos, sin = torch.cat([cos_s, cos_l]), torch.cat([sin_s, sin_l])
            self.long_offset = orig
        self.register_buffer("cos_cache", cos.to(device=device, dtype=dtype), persistent=False)  # [P, R]
        self.register_buffer("sin_cache", sin.to(device=device, dtype=dtype), persistent=False)  # [P, R]

    def cos_sin(self, positions: torch.Tensor, attn_metadata=None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin) each [T, 1, rotary_dim], broadcast over heads."""
        if self.long_offset:
            idx = positions
            if attn_metadata is not None:
                q_lens = attn_metadata.query_start_loc.diff()
                tok_seq_lens = torch.repeat_interleave(attn_metadata.seq_lens, q_lens, output_size=positions.numel())
            else:
                tok_seq_lens = positions + 1
            idx = positions + (tok_seq_lens > self.long_offset).to(positions.dtype) * self.long_offset
        else:
            idx = positions
        return self.cos_cache[idx].unsqueeze(1), self.sin_cache[idx].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, head_dim] with cos/sin [T, 1, rotary_dim] from `cos_sin` -> rotated copy [T, H, head_dim]."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return torch.addcmul(x * cos, torch.roll(x, r // 2, dims=-1), sin)
    xr = x[..., :r]  # partial rotary: the tail of each head passes through
    out = torch.addcmul(xr * cos, torch.roll(xr, r // 2, dims=-1), sin)
    return torch.cat([out, x[..., r:]], dim=-1)


def get_rope(hf_config, head_dim: int, *, dtype, device) -> RotaryEmbedding:
    """The rotary embedding an HF config asks for."""
    return RotaryEmbedding(
        head_dim, int(hf_config.max_position_embeddings), rope_parameters(hf_config), dtype=dtype, device=device
    )
