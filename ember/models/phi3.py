"""Phi3ForCausalLM: the Llama block with q|k|v and gate|up already fused in the checkpoint, longrope (su)
scaling with short/long factors and `partial_rotary_factor`, both handled by the shared rotary table."""

from __future__ import annotations

from ember.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 / Phi-3.5 / Phi-4-mini dense models."""

    stacked_params: list[tuple[str, str, int]] = []  # qkv_proj / gate_up_proj load whole
