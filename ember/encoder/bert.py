"""BERT-family encoders (BertModel, XLMRobertaModel/RobertaModel) and their sequence-classification heads.

Post-norm transformer blocks over a packed batch: tokens of every sequence side by side, `[T, H]`, so the
linears never see padding; only attention pads, per `EncoderMetadata`. q|k|v are fused into one Linear.
Module names follow the HF checkpoint (`embeddings.*`, `encoder.layer.N.*`, `pooler.*`, `classifier.*`)
with q/k/v mapped onto the fused `qkv` (see `load_encoder_weights`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.encoder.attention import EncoderMetadata, dense_attention
from ember.layers.cpu_pack import PackedCPUMethod
from ember.layers.linear import Linear

# hidden_act -> (torch function, oneDNN post-op name and algorithm, or None when oneDNN has no such post-op)
_ACTIVATIONS = {"gelu": (F.gelu, ("gelu", "none")), "gelu_new": (lambda x: F.gelu(x, approximate="tanh"), ("gelu", "tanh")),
                "gelu_pytorch_tanh": (lambda x: F.gelu(x, approximate="tanh"), ("gelu", "tanh")),
                "relu": (F.relu, ("relu", "")), "silu": (F.silu, ("swish", ""))}


def _linear_act(layer: Linear, x: torch.Tensor, act) -> torch.Tensor:
    """act(layer(x)); one oneDNN call (bias and activation as post-ops) when the weight is packed for it."""
    fn, post_op = act
    if isinstance(layer.quant_method, PackedCPUMethod) and layer.lora is None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), layer.weight, layer.bias, post_op[0], [], post_op[1])
    return fn(layer(x))


def _linear_add(layer: Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """layer(x) + residual; the add is a oneDNN post-op when the weight is packed for it."""
    if isinstance(layer.quant_method, PackedCPUMethod) and layer.lora is None:
        return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), residual.contiguous(), layer.weight, layer.bias, "add")
    return layer(x) + residual


class BertEmbeddings(nn.Module):
    """word + position + token type, then LayerNorm. [T] ids -> [T, H]."""

    def __init__(self, cfg, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, **kw)
        self.token_type_embeddings = nn.Embedding(max(1, cfg.type_vocab_size), cfg.hidden_size, **kw)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

    def forward(self, input_ids, token_type_ids, positions):
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    """Self-attention (bidirectional) and MLP, each followed by add & LayerNorm. [T, H] -> [T, H]."""

    def __init__(self, cfg, dtype, device):
        super().__init__()
        h, kw = cfg.hidden_size, dict(dtype=dtype, device=device)
        self.num_heads, self.head_dim = cfg.num_attention_heads, h // cfg.num_attention_heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.qkv = Linear(h, [h, h, h], bias=True, **kw)
        self.attention.output = nn.Module()
        self.attention.output.dense = Linear(h, h, bias=True, **kw)
        self.attention.output.LayerNorm = nn.LayerNorm(h, eps=cfg.layer_norm_eps, **kw)
        self.intermediate = nn.Module()
        self.intermediate.dense = Linear(h, cfg.intermediate_size, bias=True, **kw)
        self.output = nn.Module()
        self.output.dense = Linear(cfg.intermediate_size, h, bias=True, **kw)
        self.output.LayerNorm = nn.LayerNorm(h, eps=cfg.layer_norm_eps, **kw)
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}; supported: {', '.join(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.attention.self.qkv(x).view(num_tokens, 3, self.num_heads, self.head_dim)  # [T, 3, nh, D]
        attn = dense_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], meta, scale=self.head_dim**-0.5, is_causal=False)
        x = self.attention.output.LayerNorm(_linear_add(self.attention.output.dense, attn.reshape(num_tokens, -1), x))  # [T, H]
        y = _linear_act(self.intermediate.dense, x, self.act)  # [T, I]
        return self.output.LayerNorm(_linear_add(self.output.dense, y, x))


class BertEncoderModel(nn.Module):
    """BertModel / XLMRobertaModel body; `head` adds the checkpoint's classification head when it has one:
    "bert" (pooler dense+tanh on [CLS], then `classifier`) or "roberta" (`classifier.dense`+tanh, `classifier.out_proj`)."""

    is_causal = False

    def __init__(self, hf_config, dtype: torch.dtype = torch.float32, device="cpu", head: str | None = None):
        super().__init__()
        cfg = hf_config
        if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise ValueError(f"position_embedding_type {cfg.position_embedding_type!r} is not supported; only absolute")
        self.config, self.dtype, self.device, self.head = cfg, dtype, torch.device(device), head
        self.hidden_size = cfg.hidden_size
        # RoBERTa numbers positions from padding_idx + 1 (its position table has those leading rows)
        self.position_offset = (cfg.pad_token_id + 1) if cfg.model_type in ("roberta", "xlm-roberta") else 0
        self.embeddings = BertEmbeddings(cfg, dtype, device)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(cfg, dtype, device) for _ in range(cfg.num_hidden_layers))
        kw = dict(dtype=dtype, device=device)
        num_labels = getattr(cfg, "num_labels", 1)
        if head == "bert":
            self.pooler = nn.Module()
            self.pooler.dense = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, **kw)
            self.classifier = Linear(cfg.hidden_size, num_labels, bias=True, **kw)
        elif head == "roberta":
            self.classifier = nn.Module()
            self.classifier.dense = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, **kw)
            self.classifier.out_proj = Linear(cfg.hidden_size, num_labels, bias=True, **kw)
        elif head is not None:
            raise ValueError(f"unknown BERT head {head!r}")

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings - self.position_offset

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, positions: torch.Tensor,
                meta: EncoderMetadata) -> torch.Tensor:
        """input_ids, token_type_ids, positions [T] (positions count from 0 in each sequence) -> hidden [T, H]."""
        x = self.embeddings(input_ids, token_type_ids, positions + self.position_offset)
        for layer in self.encoder.layer:
            x = layer(x, meta)
        return x

    def classify(self, hidden: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        """hidden [T, H] -> logits [B, num_labels] float32, from each sequence's first ([CLS]/<s>) token."""
        first = hidden[meta.query_start_loc[:-1].long()]  # [B, H]
        if self.head == "bert":
            return self.classifier(torch.tanh(self.pooler.dense(first))).float()
        return self.classifier.out_proj(torch.tanh(self.classifier.dense(first))).float()
