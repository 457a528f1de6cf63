"""Everything an encoder engine derives once from the config: checkpoint, tokenizer, model, what it serves,
pooling, and the context limit (STYLE habit 1: run-time values here, not in the config)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ember.checkpoint import load_checkpoint, resolve_checkpoint_path
from ember.encoder.models import EncoderSpec, build_encoder_model, load_encoder_weights
from ember.encoder.pooling import PoolingConfig, read_pooling_config
from ember.encoder.runner import EncoderRunner
from ember.worker.device import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


@dataclass
class EncoderSetup:
    checkpoint: object  # ember.checkpoint Checkpoint
    tokenizer: object  # transformers PreTrainedTokenizerFast
    runner: EncoderRunner
    spec: EncoderSpec
    pooling: PoolingConfig
    hidden_size: int  # embedding width before any `dimensions` truncation
    max_model_len: int  # tokens per input, special tokens included
    device: torch.device
    dtype: torch.dtype


def is_encoder_config(cfg) -> bool:
    return cfg.trt_llm.build.base_model in ("encoder", "encoder_bert")


def build_encoder_setup(cfg) -> EncoderSetup:
    build, em = cfg.trt_llm.build, cfg.ember
    path = resolve_checkpoint_path(build.checkpoint_repository)
    ckpt = load_checkpoint(path)
    if ckpt.format != "safetensors":
        raise ValueError(f"base_model {build.base_model} needs a safetensors checkpoint directory; {path} is {ckpt.format}")
    device = resolve_device(em.device)
    dtype = resolve_dtype(em.dtype, device)
    if em.num_threads:
        torch.set_num_threads(em.num_threads)
    model, spec = build_encoder_model(ckpt.architecture, ckpt.hf_config, dtype, device)
    if (build.base_model == "encoder_bert") == model.is_causal:
        logger.warning("base_model %s but %s is a %s model; serving it as what it is", build.base_model,
                       ckpt.architecture, "causal" if model.is_causal else "BERT-family")
    load_encoder_weights(model, ckpt.architecture, ckpt.iter_weights())
    model.eval()
    pooling = read_pooling_config(path, model.is_causal, em.pooling, em.normalize)
    max_len = min(build.max_seq_len, model.max_positions) if build.max_seq_len else model.max_positions
    window = getattr(ckpt.hf_config, "sliding_window", None) if model.is_causal else None
    if window:
        max_len = min(max_len, int(window))  # the dense causal attention has no sliding-window mask
    tokenizer = ckpt.load_tokenizer()
    logger.info("encoder: %s (%s) on %s in %s, task %s, pooling %s%s (%s), max %d tokens per input", ckpt.architecture,
                path, device, dtype, spec.task, pooling.mode, " + normalize" if pooling.normalize else "", pooling.source, max_len)
    return EncoderSetup(ckpt, tokenizer, EncoderRunner(model, spec, pooling, device), spec, pooling,
                        model.hidden_size, int(max_len), device, dtype)
