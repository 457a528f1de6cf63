"""One encoder forward over a batch of whole sequences: token lists -> packed tensors -> model -> pooled
embeddings or classification logits. Nothing survives the call (no KV cache, no per-request state)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.encoder.attention import build_encoder_metadata
from ember.encoder.models import EncoderSpec
from ember.encoder.pooling import PoolingConfig, finish_embeddings, pool
from ember.layers.cpu_pack import pack_model_for_cpu


@dataclass
class EncoderInput:
    """One sequence to encode (a text, or a query/document pair for a cross-encoder)."""

    token_ids: list[int]
    token_type_ids: list[int] | None = None  # BERT segment ids of a pair; None: all zero


class EncoderRunner:
    """Turns a batch of `EncoderInput` into one float32 row each: the (normalized) embedding for "embed"
    models, the logits for "classify" models."""

    def __init__(self, model, spec: EncoderSpec, pooling: PoolingConfig, device: torch.device):
        self.model, self.spec, self.pooling, self.device = model, spec, pooling, device
        pack_model_for_cpu(model)  # bf16 on CPU: weights in oneDNN's layout, packed once

    @torch.inference_mode()
    def run(self, batch: list[EncoderInput]) -> torch.Tensor:
        """-> [B, D] float32 on CPU: embeddings ([B, hidden]) or logits ([B, num_labels])."""
        seq_lens = [len(x.token_ids) for x in batch]
        ids = torch.tensor([t for x in batch for t in x.token_ids], dtype=torch.int64)  # [T]
        if any(x.token_type_ids for x in batch):
            types = torch.tensor([t for x in batch for t in (x.token_type_ids or [0] * len(x.token_ids))], dtype=torch.int64)
        else:
            types = torch.zeros_like(ids)
        positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in seq_lens])  # [T]
        meta = build_encoder_metadata(seq_lens, self.device)
        hidden = self.model(ids.to(self.device), types.to(self.device), positions.to(self.device), meta)  # [T, H]
        if self.spec.task == "classify":
            out = self.model.classify(hidden, meta)  # [B, num_labels]
        else:
            out = finish_embeddings(pool(hidden, seq_lens, self.pooling.mode), self.pooling.normalize)  # [B, H]
        return out.float().cpu()
