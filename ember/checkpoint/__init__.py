"""Checkpoints: where they are (HF cache, local dir/.gguf, the default model) and how to read them."""

from ember.checkpoint.default import DEFAULT_MODEL, default_model_path, pull_default_model
from ember.checkpoint.loader import Checkpoint, load_checkpoint
from ember.checkpoint.sources import resolve_checkpoint_path

__all__ = [
    "DEFAULT_MODEL",
    "Checkpoint",
    "default_model_path",
    "load_checkpoint",
    "pull_default_model",
    "resolve_checkpoint_path",
]
