"""Architecture name (HF `architectures[0]`) -> ember model class."""

from __future__ import annotations

import importlib

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("ember.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("ember.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("ember.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("ember.models.llama", "Qwen3ForCausalLM"),
    "Gemma2ForCausalLM": ("ember.models.gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("ember.models.gemma3", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("ember.models.gemma3", "Gemma3ForConditionalGeneration"),
    "Phi3ForCausalLM": ("ember.models.phi3", "Phi3ForCausalLM"),
    "MixtralForCausalLM": ("ember.models.moe", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("ember.models.moe", "Qwen3MoeForCausalLM"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


def get_model_class(architecture: str) -> type:
    """The ember class implementing an HF architecture; ValueError naming the supported ones otherwise."""
    if architecture not in _MODELS:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
