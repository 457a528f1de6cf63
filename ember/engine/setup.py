"""Everything the engine derives once from the config at start-up: checkpoint, tokenizer, model
runner, KV cache size, scheduler. Run-time values (number of KV blocks, eos ids, context length) live
in `EngineSetup`, not in the config (STYLE habit 1)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ember.checkpoint import load_checkpoint, resolve_checkpoint_path
from ember.core.block_manager import BlockManager
from ember.core.window_blocks import HybridBlockManager, WindowBlockManager
from ember.core.scheduler import Scheduler
from ember.lora import build_lora_manager
from ember.spec import build_speculator
from ember.worker.device import resolve_device, resolve_dtype
from ember.worker.executor import Executor
from ember.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class EngineSetup:
    checkpoint: object  # ember.checkpoint Checkpoint
    tokenizer: object  # transformers PreTrainedTokenizerFast
    chat_template: str | None
    runner: ModelRunner
    scheduler: Scheduler
    max_model_len: int  # prompt + output tokens
    num_kv_blocks: int
    block_size: int
    eos_token_ids: list[int]
    device: torch.device
    dtype: torch.dtype
    speculator: object = None  # ember.spec Speculator (or NoSpeculator) from build.speculator
    executor: Executor | None = None  # the ranks running the model (rank 0's runner, plus TP workers)


def _num_kv_blocks(cfg, runner: ModelRunner, device: torch.device, max_model_len: int, max_batch_size: int) -> int:
    rt, em = cfg.trt_llm.runtime, cfg.ember
    fraction = rt.kv_cache_free_gpu_mem_fraction if rt.kv_cache_free_gpu_mem_fraction is not None else 0.9
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * fraction)
    else:
        host = em.kv_cache_memory_bytes or rt.kv_cache_host_memory_bytes or (1 << 30)
        budget = int(host * fraction) // cfg.trt_llm.build.tensor_parallel_count  # the ranks share the host
    per_block = runner.bytes_per_block()
    bs = runner.block_size
    # never more than the batch can use at once: every running sequence at full length
    useful = max_batch_size * (-(-max_model_len // bs) + 1)
    num = min(budget // per_block, useful)
    if num < -(-max_model_len // bs):
        logger.warning("KV budget of %d bytes holds %d blocks, fewer than one full-length sequence needs", budget, num)
    return max(1, int(num))


def _split_window_pool(cfg, runner: ModelRunner, num_blocks: int, max_model_len: int, max_batch_size: int,
                       window: int, sliding_layers: list[int]) -> tuple[int, int]:
    """(global blocks, sliding blocks) from the memory `num_blocks` of every layer would take. The sliding pool
    holds what the batch can use at once: each running sequence's window (+ 3 partial blocks) and the step's
    new tokens; the rest of the budget goes to the global layers, which then fit longer contexts."""
    bs, num_layers = runner.block_size, runner.model.num_layers
    num_sliding = len(sliding_layers)
    useful = max_batch_size * (-(-max_model_len // bs) + 1)
    num_window = min(num_blocks, max_batch_size * (-(-window // bs) + 3)
                     + -(-cfg.trt_llm.build.max_num_tokens // bs))
    left = num_blocks * num_layers - num_window * num_sliding  # in one layer's blocks
    num_full = max(1, min(left // (num_layers - num_sliding), useful))
    logger.info("sliding-window layers (%d of %d, window %d) keep %d blocks of their own; global layers %d",
                num_sliding, num_layers, window, num_window, num_full)
    return num_full, num_window


def quantization_name(ckpt) -> str:
    """The quantization_type the loaded weights carry: an engine's from its manifest, else no_quant."""
    quant = getattr(ckpt.hf_config, "ember_quantization", None) if ckpt.format == "engine" else None
    return (quant or {}).get("type") or "no_quant"


def weight_bytes(model) -> int:
    """Bytes of this rank's weights as resident (quantized ones in their stored format), tied ones once."""
    return sum(t.numel() * t.element_size() for t in model.parameters())  # parameters() yields a tied one once


def build_engine_setup(cfg) -> EngineSetup:
    build, rt, em = cfg.trt_llm.build, cfg.trt_llm.runtime, cfg.ember
    path = resolve_checkpoint_path(build.checkpoint_repository)
    ckpt = load_checkpoint(path)  # an engine directory loads as a checkpoint carrying its quantization
    if build.quantization_type != "no_quant" and ckpt.format != "engine":
        # LLM(CONFIG) and `ember serve CONFIG` build it first (ember.build.engine_cache); a bare LLMEngine does not
        logger.warning("quantization_type %s takes effect when building: serve the config with `ember serve` or "
                       "LLM(), or run `ember build CONFIG -o DIR` and serve DIR; serving %s unquantized",
                       build.quantization_type, path)
    device = resolve_device(em.device)
    dtype = resolve_dtype(em.dtype, device)
    if em.num_threads:
        torch.set_num_threads(em.num_threads)
    tokenizer = ckpt.load_tokenizer()
    executor = Executor.start(cfg, ckpt, dtype, device)  # tensor_parallel_count > 1: also the worker ranks
    runner = executor.runner
    runner.lora_manager = build_lora_manager(cfg, runner.model, dtype, device)  # None: no adapters configured
    model_max = int(getattr(ckpt, "max_position_embeddings", None) or getattr(ckpt.hf_config, "max_position_embeddings", 0) or 2048)
    max_model_len = min(build.max_seq_len, model_max) if build.max_seq_len else model_max
    max_batch_size = build.max_batch_size
    num_blocks = _num_kv_blocks(cfg, runner, device, max_model_len, max_batch_size)
    windows = runner.window_layers() if build.speculator is None else None  # tree drafts move KV in one table
    num_window_blocks = 0
    if windows is not None:
        num_blocks, num_window_blocks = _split_window_pool(cfg, runner, num_blocks, max_model_len, max_batch_size,
                                                           *windows)
    executor.allocate_kv_cache(num_blocks, num_window_blocks)
    # a sequence can never be longer than the whole KV cache
    max_model_len = min(max_model_len, num_blocks * em.block_size)
    if not em.enforce_eager:
        runner.enable_cuda_graphs(max_model_len, max_batch_size)  # CUDA only; a no-op elsewhere
        if em.compile:
            runner.enable_compile(build.max_num_tokens)  # CPU, single rank; else it says why and stays eager
    block_manager = BlockManager(num_blocks, em.block_size, em.enable_prefix_caching)
    if num_window_blocks:
        block_manager = HybridBlockManager(block_manager, WindowBlockManager(
            num_window_blocks, em.block_size, windows[0], em.enable_prefix_caching))
    scheduler = Scheduler(block_manager, max_num_tokens=build.max_num_tokens, max_batch_size=max_batch_size,
                          max_seq_len=max_model_len, policy=rt.batch_scheduler_policy,
                          enable_chunked_prefill=rt.enable_chunked_context, max_queue_size=em.max_queue_size,
                          max_loras=em.max_loras if runner.lora_manager is not None else None)
    logger.info("engine: %s (%s) on %s in %s, %s weights %.1f MiB, %d KV blocks of %d tokens, context %d",
                ckpt.architecture, path, device, dtype, quantization_name(ckpt), weight_bytes(runner.model) / (1 << 20),
                num_blocks, em.block_size, max_model_len)
    return EngineSetup(ckpt, tokenizer, ckpt.chat_template, runner, scheduler, max_model_len, num_blocks,
                       em.block_size, list(ckpt.eos_token_ids), device, dtype,
                       build_speculator(build.speculator, device.type, dtype.itemsize), executor=executor)
