"""Gemma 3 text models: Gemma3ForCausalLM and the language model of Gemma3ForConditionalGeneration.

Gemma 2's block (four (1 + w) norms, sqrt(hidden) embedding scale, query_pre_attn_scalar) plus per-head (1 + w)
q/k RMSNorm before rotary, interleaved sliding/global layers from `layer_types`, and two rotary tables: sliding
layers rotate with `rope_parameters["sliding_attention"]` (rope_local_base_freq), global layers with
`rope_parameters["full_attention"]`. Soft-capping as transformers applies it: `attn_logit_softcapping` never (Gemma3Attention does not pass it),
`final_logit_softcapping` only in Gemma3ForCausalLM (Gemma3ForConditionalGeneration's head does not cap).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from ember.distributed.parallel import SINGLE, ParallelContext
from ember.layers.attention import get_attention_backend
from ember.layers.embedding import VocabEmbedding
from ember.layers.norm import HeadRMSNorm, RMSNorm
from ember.layers.rotary import RotaryEmbedding
from ember.models.base import CausalLM, head_dim_of, layer_sliding_window
from ember.models.gemma import Gemma2DecoderLayer
from ember.models.llama import Attention

logger = logging.getLogger(__name__)


def _rope_params(cfg, layer_type: str) -> dict:
    """One layer type's rotary settings as RotaryEmbedding reads them."""
    params = dict((getattr(cfg, "rope_parameters", None) or {}).get(layer_type) or {})
    if layer_type == "sliding_attention":
        params.setdefault("rope_theta", getattr(cfg, "rope_local_base_freq", 10_000.0))
    else:
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 1_000_000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.setdefault("partial_rotary_factor", 1.0)
    return params


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's block with Gemma 3's attention: per-head (1 + w) q/k norm, no logit soft-capping.
    `is_sliding` picks the rotary table."""

    def __init__(self, cfg, layer_idx: int, backend, *, dtype, device, parallel: ParallelContext = SINGLE):
        super().__init__(cfg, layer_idx, backend, dtype=dtype, device=device, parallel=parallel)
        self.is_sliding = cfg.layer_types[layer_idx] == "sliding_attention"

    def make_attention(self, cfg, layer_idx: int, backend, *, dtype, device, parallel: ParallelContext) -> Attention:
        bias = bool(getattr(cfg, "attention_bias", False))
        attn = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim_of(cfg),
                         backend=backend, scale=cfg.query_pre_attn_scalar**-0.5, qkv_bias=bias, o_bias=bias,
                         sliding_window=layer_sliding_window(cfg, layer_idx), dtype=dtype, device=device,
                         parallel=parallel)  # transformers' Gemma3Attention never soft-caps
        attn.qk_norm = HeadRMSNorm(attn.num_heads, attn.num_kv_heads, head_dim_of(cfg), cfg.rms_norm_eps,
                                   dtype=dtype, device=device, weight_offset=1.0)  # Gemma's (1 + w)
        return attn


class Gemma3TextModel(nn.Module):
    """embed -> layers -> final norm, with a local (sliding) and a global rotary table. No `body`: the compiled
    forward (one shared rotary table) does not apply, so Gemma 3 runs eager."""

    def __init__(self, cfg, backend, *, dtype, device, parallel: ParallelContext = SINGLE):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, scale=cfg.hidden_size**0.5,
                                           dtype=dtype, device=device, parallel=parallel)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, i, backend, dtype=dtype, device=device, parallel=parallel)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, weight_offset=1.0, dtype=dtype, device=device)
        head_dim, max_pos = head_dim_of(cfg), int(cfg.max_position_embeddings)
        self.rotary = RotaryEmbedding(head_dim, max_pos, _rope_params(cfg, "full_attention"),
                                      dtype=dtype, device=device)
        self.rotary_local = RotaryEmbedding(head_dim, max_pos, _rope_params(cfg, "sliding_attention"),
                                            dtype=dtype, device=device)

    def forward(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        glob = self.rotary.cos_sin(positions, attn_metadata)  # (cos, sin) each [T, 1, R]
        local = self.rotary_local.cos_sin(positions, attn_metadata)
        hidden = self.embed_tokens(input_ids)  # [T, H]
        residual = None
        window_metadata = getattr(attn_metadata, "window", None) or attn_metadata  # the sliding layers' own table
        for layer, kv_cache in zip(self.layers, kv_caches):
            cos, sin = local if layer.is_sliding else glob
            md = window_metadata if layer.is_sliding else attn_metadata
            hidden, residual = layer(hidden, residual, cos, sin, kv_cache, md)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma3ForCausalLM(CausalLM):
    """Gemma 3 text; embeddings are always tied."""

    renamed_params = [(".self_attn.q_norm.weight", ".self_attn.qk_norm.q_weight"),
                      (".self_attn.k_norm.weight", ".self_attn.qk_norm.k_weight")]

    def __init__(self, hf_config, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        cfg = getattr(hf_config, "text_config", None) or hf_config
        device = self._init_shape(cfg, dtype, device, parallel)
        self.final_logit_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.model = Gemma3TextModel(cfg, get_attention_backend(device), dtype=dtype, device=device,
                                     parallel=parallel)
        self.lm_head = None

    def forward(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        """input_ids [T], positions [T] -> final-normed hidden [T, H]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def sliding_window_layers(self) -> tuple[int, list[int]] | None:
        sliding = [i for i, layer in enumerate(self.model.layers) if layer.self_attn.sliding_window]
        if not sliding or len(sliding) == self.num_layers:
            return None
        return self.model.layers[sliding[0]].self_attn.sliding_window, sliding


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The language model of a Gemma 3 vision-language checkpoint; the vision tower and projector are skipped
    (ember serves text only)."""

    _TEXT_PREFIXES = ("model.language_model.", "language_model.model.")
    _VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                        "multi_modal_projector.")

    def __init__(self, hf_config, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 parallel: ParallelContext = SINGLE):
        super().__init__(hf_config, dtype, device, parallel)
        self.final_logit_softcap = None  # transformers' Gemma3ForConditionalGeneration returns uncapped logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def text_only():
            skipped = 0
            for name, tensor in weights:
                if name.startswith(self._VISION_PREFIXES):
                    skipped += 1
                    continue
                for prefix in self._TEXT_PREFIXES:
                    if name.startswith(prefix):
                        name = "model." + name[len(prefix):]
                        break
                if name == "language_model.lm_head.weight":
                    name = "lm_head.weight"
                yield name, tensor
            if skipped:
                logger.info("Gemma3ForConditionalGeneration: vision tower ignored (%d tensors); text only", skipped)

        super().load_weights(text_only())
