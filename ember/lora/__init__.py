"""Multi-LoRA: PEFT adapters served from one base model, mixed token by token in one forward pass."""

from ember.lora.adapter import AdapterError, LoRAAdapter, load_adapter
from ember.lora.layer import LoRABatchMetadata, LoRALinear
from ember.lora.manager import LoRAManager, build_lora_manager

__all__ = ["AdapterError", "LoRAAdapter", "LoRABatchMetadata", "LoRALinear", "LoRAManager", "build_lora_manager",
           "load_adapter"]
