"""Which encoder class computes a checkpoint, what it serves, and loading its HF-named weights.

Tasks: "embed" (a pooled vector per input: /v1/embeddings) and "classify" (logits per input: /predict, and
/rerank when there is one label). The task follows from the architecture: `*ForSequenceClassification`
classifies, everything else embeds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ember.encoder.bert import BertEncoderModel
from ember.encoder.causal import CausalEncoderModel, decoder_architecture
from ember.encoder.modernbert import ModernBertEncoderModel
from ember.layers.linear import Linear

logger = logging.getLogger(__name__)

# architecture -> (checkpoint prefix of the body, head kind or None)
_BERT_ARCHITECTURES = {
    "BertModel": ("bert.", None),
    "BertForMaskedLM": ("bert.", None),
    "BertForSequenceClassification": ("bert.", "bert"),
    "RobertaModel": ("roberta.", None),
    "RobertaForSequenceClassification": ("roberta.", "roberta"),
    "XLMRobertaModel": ("roberta.", None),
    "XLMRobertaForSequenceClassification": ("roberta.", "roberta"),
    "ModernBertModel": ("model.", None),
    "ModernBertForMaskedLM": ("model.", None),
    "ModernBertForSequenceClassification": ("model.", "modernbert"),
}
# (checkpoint name part, our name part, shard): q/k/v load into the fused qkv
_BERT_STACKED = ((".attention.self.query.", ".attention.self.qkv.", 0),
                 (".attention.self.key.", ".attention.self.qkv.", 1),
                 (".attention.self.value.", ".attention.self.qkv.", 2))
# tensors a BERT checkpoint may carry that an embedder does not use
_BERT_UNUSED = ("cls.", "lm_head.", "embeddings.position_ids")


@dataclass(frozen=True)
class EncoderSpec:
    """What an architecture serves."""

    task: str  # "embed" | "classify"
    num_labels: int  # classify: logits per input; embed: 0
    labels: list[str]  # classify: label names by index (config id2label)


def supported_architectures() -> list[str]:  # noqa: D401 - for error messages
    causal = [f"{f}{s}" for f in ("Llama", "Mistral", "Qwen2", "Qwen3") for s in ("Model", "ForCausalLM", "ForSequenceClassification")]
    return sorted(_BERT_ARCHITECTURES) + causal


def build_encoder_model(architecture: str, hf_config, dtype: torch.dtype, device) -> tuple[nn.Module, EncoderSpec]:
    """An empty (unloaded) encoder for the checkpoint's architecture and what it serves."""
    is_classifier = architecture.endswith("ForSequenceClassification")
    if architecture.startswith("ModernBert") and architecture in _BERT_ARCHITECTURES:
        model = ModernBertEncoderModel(hf_config, dtype, device, head=_BERT_ARCHITECTURES[architecture][1])
    elif architecture in _BERT_ARCHITECTURES:
        model = BertEncoderModel(hf_config, dtype, device, head=_BERT_ARCHITECTURES[architecture][1])
    elif decoder_architecture(architecture) is not None:
        model = CausalEncoderModel(hf_config, architecture, dtype, device, has_score=is_classifier)
    else:
        raise ValueError(f"unsupported encoder architecture {architecture!r}; supported: {', '.join(supported_architectures())}")
    if not is_classifier:
        return model, EncoderSpec("embed", 0, [])
    num_labels = int(getattr(hf_config, "num_labels", 1))
    id2label = getattr(hf_config, "id2label", None) or {}
    labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)]
    return model, EncoderSpec("classify", num_labels, labels)


@torch.no_grad()
def load_encoder_weights(model: nn.Module, architecture: str, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load HF-named tensors into `model`; raises naming unexpected or missing tensors."""
    if isinstance(model, CausalEncoderModel):
        model.load_weights(weights)
        return
    prefix = _BERT_ARCHITECTURES[architecture][0]
    params = dict(model.named_parameters())
    expected = set(params)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for hf_name, tensor in weights:
        name = hf_name[len(prefix):] if hf_name.startswith(prefix) else hf_name
        if name.startswith(_BERT_UNUSED) or (name.startswith("pooler.") and getattr(model, "head", None) != "bert") or (
                architecture == "ModernBertForMaskedLM" and name.startswith(("head.", "decoder."))):
            continue  # MLM heads, stored position ids, and a pooler that only BertForSequenceClassification uses
        if name.startswith("LayerNorm.") or ".LayerNorm." in name:
            name = name.replace(".gamma", ".weight").replace(".beta", ".bias")  # very old checkpoints
        shard = None
        for src, dst, s in _BERT_STACKED:
            if src in name:
                name, shard = name.replace(src, dst), s
        path, _, pname = name.rpartition(".")
        if name not in params:
            unexpected.append(hf_name)
            continue
        module = model.get_submodule(path)
        if isinstance(module, Linear):
            module.load_weight(pname, tensor, shard)
            key = f"{name}#{shard}" if shard is not None else name
        else:
            param = params[name]
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"checkpoint tensor {hf_name}: expected shape {tuple(param.shape)}, found {tuple(tensor.shape)}")
            param.data.copy_(tensor)
            key = name
        loaded.add(key)
    if unexpected:
        raise ValueError(f"{architecture}: unexpected tensors in checkpoint: {', '.join(sorted(unexpected)[:20])}")
    fused = {n for n in expected if ".attention.self.qkv." in n}
    need = (expected - fused) | {f"{n}#{s}" for n in fused for s in range(3)}
    missing = sorted(need - loaded)
    if missing:
        raise ValueError(f"{architecture}: tensors missing from checkpoint: {', '.join(missing[:20])}")
    for module in model.modules():
        if isinstance(module, Linear):
            module.process_weights_after_loading()
