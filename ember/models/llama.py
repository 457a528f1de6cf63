"""The Llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.

One decoder, driven by the HF config: q/k/v bias (Qwen2, or `attention_bias`), per-head q/k RMSNorm (Qwen3),
sliding-window layers (Mistral `sliding_window`, Qwen `layer_types`), rope scaling from `rope_parameters`.
q|k|v and gate|up are fused into one matmul each; norms carry the residual stream.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.distributed.parallel import SINGLE, ParallelContext
from ember.layers.activation import get_gated_activation
from ember.layers.attention import AttentionBackend, AttentionMetadata, get_attention_backend
from ember.layers.embedding import VocabEmbedding
from ember.layers.linear import Linear
from ember.layers.norm import HeadRMSNorm, RMSNorm
from ember.layers.rotary import apply_rotary, get_rope
from ember.models.base import CausalLM, head_dim_of, layer_sliding_window
from ember.models.compiled import paged_attention


def lora_of(attn_metadata) -> object | None:
    """The forward's LoRA mapping (AttentionMetadata.lora); None inside a compiled forward, whose layers get an
    opaque attention handle instead (ember.models.compiled, which adapters never use) or an encoder's metadata."""
    return attn_metadata.lora if isinstance(attn_metadata, AttentionMetadata) else None


class Attention(nn.Module):
    """Fused-qkv self-attention over the paged cache. hidden [T, H] -> [T, H]."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        backend: AttentionBackend,
        scale: float,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        dtype,
        device,
        parallel: ParallelContext = SINGLE,
    ):
        super().__init__()
        # per rank: a slice of the query heads; of the KV heads, a slice (or one, replicated, when fewer than ranks)
        q_full, kv_full = num_heads * head_dim, num_kv_heads * head_dim
        (q_start, num_heads), (kv_start, num_kv_heads) = parallel.shard_heads(num_heads, num_kv_heads)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale, self.sliding_window, self.logit_softcap = scale, sliding_window, logit_softcap
        self.backend = backend
        q_shard, kv_shard = (q_start * head_dim, self.q_size), (kv_start * head_dim, self.kv_size)
        self.qkv_proj = Linear(hidden_size, [q_full, kv_full, kv_full], bias=qkv_bias, dtype=dtype, device=device,
                               parallel=parallel, split="column", shards=[q_shard, kv_shard, kv_shard])
        self.o_proj = Linear(q_full, hidden_size, bias=o_bias, dtype=dtype, device=device,
                             parallel=parallel, split="row", shards=[q_shard])
        self.qk_norm = (
            HeadRMSNorm(num_heads, num_kv_heads, head_dim, qk_norm_eps, dtype=dtype, device=device)
            if qk_norm_eps is not None
            else None
        )

    def forward(self, hidden, cos, sin, kv_cache, attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        lora = lora_of(attn_metadata)  # this forward's per-token LoRA slots (None: no adapters)
        qkv = self.qkv_proj(hidden, lora)  # [T, (Hq + 2 Hk) * D]
        # q and k heads are adjacent in qkv: normalize and rotate them as one tensor.
        qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hk, D]
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        qk = apply_rotary(qk, cos, sin)  # [T, Hq + Hk, D]
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        out = paged_attention(
            self.backend, q, k, v, kv_cache, attn_metadata,
            scale=self.scale, sliding_window=self.sliding_window, logit_softcap=self.logit_softcap,
            kv_scale=getattr(self, "kv_scale", None),  # [2] K/V scales of a quantized (fp8) cache, set by an engine
        )  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, self.q_size), lora)


class MLP(nn.Module):
    """down(act(gate) * up) with gate|up fused. [T, H] -> [T, H]."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, *, bias: bool = False, dtype, device,
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, [intermediate_size, intermediate_size], bias=bias,
                                   dtype=dtype, device=device, parallel=parallel, split="column")
        self.act = get_gated_activation(act)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, dtype=dtype, device=device,
                                parallel=parallel, split="row")

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """lora: the forward's ember.lora.LoRABatchMetadata, or None."""
        return self.down_proj(self.act(self.gate_up_proj(x, lora)), lora)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; `residual` is the running stream, added inside the next norm."""

    def __init__(self, cfg, layer_idx: int, backend, *, qkv_bias: bool, has_qk_norm: bool, dtype, device,
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        head_dim = head_dim_of(cfg)
        attn_bias = bool(getattr(cfg, "attention_bias", False))
        self.self_attn = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads, head_dim,
            backend=backend, scale=head_dim**-0.5, qkv_bias=qkv_bias or attn_bias, o_bias=attn_bias,
            qk_norm_eps=cfg.rms_norm_eps if has_qk_norm else None,
            sliding_window=layer_sliding_window(cfg, layer_idx), dtype=dtype, device=device, parallel=parallel,
        )
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                       bias=bool(getattr(cfg, "mlp_bias", False)), dtype=dtype, device=device, parallel=parallel)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, hidden, residual, cos, sin, kv_cache, attn_metadata):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, lora_of(attn_metadata)), residual


class DecoderModel(nn.Module):
    """embed -> layers -> final norm. Holds the rotary table shared by every layer."""

    def __init__(self, cfg, layers: list[nn.Module], *, embed_scale: float | None = None,
                 norm_offset: float = 0.0, dtype, device, parallel: ParallelContext = SINGLE):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, scale=embed_scale,
                                           dtype=dtype, device=device, parallel=parallel)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, weight_offset=norm_offset, dtype=dtype, device=device)
        self.rotary = get_rope(cfg, head_dim_of(cfg), dtype=dtype, device=device)

    def forward(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        cos, sin = self.rotary.cos_sin(positions, attn_metadata)  # [T, 1, R] each, shared by all layers
        return self.body(input_ids, cos, sin, kv_caches, attn_metadata)

    def body(self, input_ids, cos, sin, kv_caches, attn_metadata) -> torch.Tensor:
        """Everything after the rotary lookup; what ember.models.compiled compiles (attn_metadata is then an
        opaque AttentionStep that only the attention calls read)."""
        hidden = self.embed_tokens(input_ids)  # [T, H]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, cos, sin, kv_cache, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(CausalLM):
    """Llama; the base of the family (subclasses only set class attributes)."""

    qkv_bias = False
    has_qk_norm = False

    def __init__(self, hf_config, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 parallel: ParallelContext = SINGLE):
        super().__init__()
        cfg = hf_config
        device = self._init_shape(cfg, dtype, device, parallel)
        backend = get_attention_backend(device)
        layers = [
            LlamaDecoderLayer(cfg, i, backend, qkv_bias=self.qkv_bias, has_qk_norm=self.has_qk_norm,
                              dtype=dtype, device=device, parallel=parallel)
            for i in range(cfg.num_hidden_layers)
        ]
        self.model = DecoderModel(cfg, layers, dtype=dtype, device=device, parallel=parallel)
        self.lm_head = (
            None if getattr(cfg, "tie_word_embeddings", False)
            else Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, device=device, parallel=parallel, split="column")
        )

    def forward(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        """input_ids [T], positions [T] -> final-normed hidden [T, H]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with an optional sliding window (from the config)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with bias on q/k/v."""

    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with per-head RMSNorm on q and k before rotary."""

    has_qk_norm = True
    renamed_params = [(".self_attn.q_norm.weight", ".self_attn.qk_norm.q_weight"),
                      (".self_attn.k_norm.weight", ".self_attn.qk_norm.k_weight")]
