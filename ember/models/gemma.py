"""Gemma2ForCausalLM: (1 + w) RMSNorms around both sublayers, embeddings scaled by sqrt(hidden),
query_pre_attn_scalar, attention and final logit soft-capping, alternating sliding-window layers, gelu-tanh MLP."""

from __future__ import annotations

import torch
from torch import nn

from ember.distributed.parallel import SINGLE, ParallelContext
from ember.layers.attention import get_attention_backend
from ember.layers.norm import RMSNorm
from ember.models.base import CausalLM, layer_sliding_window
from ember.models.llama import MLP, Attention, DecoderModel, lora_of, head_dim_of


class Gemma2DecoderLayer(nn.Module):
    """norm -> attn -> norm, add; norm -> mlp -> norm, add. The adds ride inside the next pre-norm."""

    def __init__(self, cfg, layer_idx: int, backend, *, dtype, device, parallel: ParallelContext = SINGLE):
        super().__init__()
        eps, h = cfg.rms_norm_eps, cfg.hidden_size
        self.self_attn = self.make_attention(cfg, layer_idx, backend, dtype=dtype, device=device, parallel=parallel)
        act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
        self.mlp = MLP(h, cfg.intermediate_size, act, dtype=dtype, device=device, parallel=parallel)
        norm = lambda: RMSNorm(h, eps, weight_offset=1.0, dtype=dtype, device=device)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def make_attention(self, cfg, layer_idx: int, backend, *, dtype, device, parallel: ParallelContext) -> Attention:
        """Gemma 2's attention: query_pre_attn_scalar scale, logits soft-capped (Gemma 3 overrides this)."""
        bias = bool(getattr(cfg, "attention_bias", False))
        return Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim_of(cfg),
                         backend=backend, scale=cfg.query_pre_attn_scalar**-0.5, qkv_bias=bias, o_bias=bias,
                         sliding_window=layer_sliding_window(cfg, layer_idx), logit_softcap=cfg.attn_logit_softcapping,
                         dtype=dtype, device=device, parallel=parallel)

    def forward(self, hidden, residual, cos, sin, kv_cache, attn_metadata):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, cos, sin, kv_cache, attn_metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden, lora_of(attn_metadata))), residual


class Gemma2ForCausalLM(CausalLM):
    """Gemma 2; embeddings are always tied."""

    def __init__(self, hf_config, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        cfg = hf_config
        device = self._init_shape(cfg, dtype, device, parallel)
        self.final_logit_softcap = getattr(cfg, "final_logit_softcapping", None)
        backend = get_attention_backend(device)
        layers = [Gemma2DecoderLayer(cfg, i, backend, dtype=dtype, device=device, parallel=parallel)
                  for i in range(self.num_layers)]
        self.model = DecoderModel(cfg, layers, embed_scale=cfg.hidden_size**0.5, norm_offset=1.0,
                                  dtype=dtype, device=device, parallel=parallel)
        self.lm_head = None

    def forward(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        """input_ids [T], positions [T] -> final-normed hidden [T, H]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)
