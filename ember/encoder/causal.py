"""Causal embedders and rerankers: a Llama-family decoder (Qwen3-Embedding, a Qwen2/Llama/Mistral model, or
`*ForSequenceClassification` with a `score` head) run once over whole sequences, no KV cache.

The decoder is ember's own model class (models/llama.py and friends), so its layers, fused projections,
rotary and norms are the generation path's; only the attention backend is swapped for
`CausalEncoderBackend` (dense causal attention per sequence, no paging)."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from ember.encoder.attention import CausalEncoderBackend, EncoderMetadata
from ember.layers.linear import Linear
from ember.models.registry import get_model_class

# an embedder's architecture name -> the decoder class that computes it
CAUSAL_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")


def decoder_architecture(architecture: str) -> str | None:
    """"Qwen3Model" / "Qwen3ForCausalLM" / "Qwen3ForSequenceClassification" -> "Qwen3ForCausalLM"; None if not causal."""
    for family in CAUSAL_FAMILIES:
        if architecture in (f"{family}Model", f"{family}ForCausalLM", f"{family}ForSequenceClassification"):
            return f"{family}ForCausalLM"
    return None


class CausalEncoderModel(nn.Module):
    """A decoder's final-normed hidden states for whole sequences; `classify` applies the `score` head to each
    sequence's last token (HF's *ForSequenceClassification, unpadded)."""

    is_causal = True

    def __init__(self, hf_config, architecture: str, dtype: torch.dtype = torch.float32, device="cpu",
                 has_score: bool = False):
        super().__init__()
        cfg = copy.copy(hf_config)
        cfg.tie_word_embeddings = True  # an embedder needs no LM head: don't allocate one
        self.config, self.dtype, self.device = hf_config, dtype, torch.device(device)
        self.hidden_size = cfg.hidden_size
        self.decoder = get_model_class(decoder_architecture(architecture))(cfg, dtype=dtype, device=device)
        backend = CausalEncoderBackend()
        for module in self.decoder.modules():
            if hasattr(module, "backend"):
                module.backend = backend
        self.score = Linear(cfg.hidden_size, getattr(hf_config, "num_labels", 1), dtype=dtype, device=device) if has_score else None

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 2048)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, positions: torch.Tensor,
                meta: EncoderMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final-normed hidden [T, H]; token_type_ids are unused."""
        return self.decoder(input_ids, positions, [None] * self.decoder.num_layers, meta)

    def classify(self, hidden: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        """hidden [T, H] -> logits [B, num_labels] float32 from each sequence's last token."""
        last = hidden[meta.query_start_loc[1:].long() - 1]  # [B, H]
        return self.score(last).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF names with or without the `model.` prefix (a bare `Qwen3Model` has none); `lm_head` is ignored."""
        has_score = self.score is not None
        found_score = False

        def decoder_weights():
            nonlocal found_score
            for name, tensor in weights:
                if name.startswith("score."):
                    if not has_score:
                        raise ValueError(f"checkpoint tensor {name}: a score head, but the architecture is not "
                                         "*ForSequenceClassification")
                    self.score.load_weight(name.split(".", 1)[1], tensor, None)
                    found_score = True
                    continue
                if name.startswith("lm_head."):
                    continue
                yield (name if name.startswith("model.") else f"model.{name}"), tensor

        self.decoder.load_weights(decoder_weights())
        if has_score and not found_score:
            raise ValueError("checkpoint has no score.weight, which *ForSequenceClassification needs")
        if has_score:
            self.score.process_weights_after_loading()
