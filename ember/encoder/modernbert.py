"""ModernBERT (ModernBertModel and ModernBertForSequenceClassification): a pre-norm bidirectional encoder with
rotary positions (one theta for global layers, another for local ones), local layers attending within a band
of `local_attention // 2` tokens either side, and a GeGLU MLP. Packed batches as in bert.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.encoder.attention import EncoderMetadata, dense_attention
from ember.layers.linear import Linear

_ACTS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "relu": F.relu}


def _act(name: str):
    if name not in _ACTS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(_ACTS)}")
    return _ACTS[name]


def _rope_theta(cfg, layer_type: str) -> float:
    params = (getattr(cfg, "rope_parameters", None) or {}).get(layer_type) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"ModernBERT rope_type {params['rope_type']!r} is not supported; only default")
    return float(params.get("rope_theta") or (cfg.global_rope_theta if layer_type == "full_attention" else cfg.local_rope_theta))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] with cos/sin [T, 1, D] (halves repeated): x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class ModernBertLayer(nn.Module):
    """attn_norm -> attention (+ residual), mlp_norm -> GeGLU MLP (+ residual). [T, H] -> [T, H]."""

    def __init__(self, cfg, layer_idx: int, dtype, device):
        super().__init__()
        h, kw = cfg.hidden_size, dict(dtype=dtype, device=device)
        self.num_heads, self.head_dim = cfg.num_attention_heads, h // cfg.num_attention_heads
        self.attn_norm = nn.Identity() if layer_idx == 0 else nn.LayerNorm(h, eps=cfg.norm_eps, bias=cfg.norm_bias, **kw)
        self.attn = nn.Module()
        self.attn.Wqkv = Linear(h, 3 * h, bias=cfg.attention_bias, **kw)
        self.attn.Wo = Linear(h, h, bias=cfg.attention_bias, **kw)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.norm_eps, bias=cfg.norm_bias, **kw)
        self.mlp = nn.Module()
        self.mlp.Wi = Linear(h, 2 * cfg.intermediate_size, bias=cfg.mlp_bias, **kw)
        self.mlp.Wo = Linear(cfg.intermediate_size, h, bias=cfg.mlp_bias, **kw)
        self.act = _act(cfg.hidden_activation)
        self.layer_type = cfg.layer_types[layer_idx]
        self.window = cfg.local_attention // 2 if self.layer_type == "sliding_attention" else None

    def forward(self, x: torch.Tensor, cos_sin: dict, meta: EncoderMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.attn.Wqkv(self.attn_norm(x)).view(num_tokens, 3, self.num_heads, self.head_dim)  # [T, 3, nh, D]
        cos, sin = cos_sin[self.layer_type]
        q, k = _rotate(qkv[:, 0], cos, sin), _rotate(qkv[:, 1], cos, sin)
        attn = dense_attention(q, k, qkv[:, 2], meta, scale=self.head_dim**-0.5, is_causal=False, window=self.window)
        x = x + self.attn.Wo(attn.reshape(num_tokens, -1))
        gate_in, gate = self.mlp.Wi(self.mlp_norm(x)).chunk(2, dim=-1)  # [T, I] each
        return x + self.mlp.Wo(self.act(gate_in) * gate)


class ModernBertEncoderModel(nn.Module):
    """ModernBertModel body (final-normed hidden states); with head="modernbert", ModernBERT's classifier:
    cls or mean pooling (config.classifier_pooling), dense -> act -> norm, then `classifier`."""

    is_causal = False

    def __init__(self, hf_config, dtype: torch.dtype = torch.float32, device="cpu", head: str | None = None):
        super().__init__()
        cfg = hf_config
        kw = dict(dtype=dtype, device=device)
        self.config, self.dtype, self.device, self.head_kind = cfg, dtype, torch.device(device), head
        self.hidden_size = cfg.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.embeddings.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias, **kw)
        self.layers = nn.ModuleList(ModernBertLayer(cfg, i, dtype, device) for i in range(cfg.num_hidden_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias, **kw)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        for layer_type in set(cfg.layer_types):
            inv_freq = 1.0 / (_rope_theta(cfg, layer_type) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            self.register_buffer(f"inv_freq_{layer_type}", inv_freq.to(self.device), persistent=False)
        if head == "modernbert":
            self.head = nn.Module()
            self.head.dense = Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.classifier_bias, **kw)
            self.head.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias, **kw)
            self.classifier = Linear(cfg.hidden_size, cfg.num_labels, bias=True, **kw)
            self.head_act = _act(cfg.classifier_activation)
            if cfg.classifier_pooling not in ("cls", "mean"):
                raise ValueError(f"classifier_pooling {cfg.classifier_pooling!r} is not one of cls, mean")
        elif head is not None:
            raise ValueError(f"unknown ModernBERT head {head!r}")

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, token_type_ids, positions: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final-normed hidden [T, H]; token_type_ids are unused."""
        x = self.embeddings.norm(self.embeddings.tok_embeddings(input_ids))
        cos_sin = {}
        for layer_type in set(self.config.layer_types):
            freqs = positions.float().unsqueeze(1) * getattr(self, f"inv_freq_{layer_type}")  # [T, D/2]
            emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [T, 1, D]
            cos_sin[layer_type] = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        for layer in self.layers:
            x = layer(x, cos_sin, meta)
        return self.final_norm(x)

    def classify(self, hidden: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        """hidden [T, H] -> logits [B, num_labels] float32."""
        if self.config.classifier_pooling == "cls":
            pooled = hidden[meta.query_start_loc[:-1].long()]  # [B, H]
        else:
            pooled = torch.stack([p.mean(0) for p in torch.split(hidden, meta.seq_lens_list)])  # [B, H]
        h = self.head.norm(self.head_act(self.head.dense(pooled)))
        return self.classifier(h).float()
