"""A worker rank (> 0): loads its shard of the model, holds its shard of the KV cache, and runs whatever
forward passes rank 0 broadcasts, until told to stop. It has no scheduler, tokenizer or sampler.

Messages (rank 0 -> all, on the control group, in order): ("kv", num_blocks) once, then ("forward",
ForwardMetadata), ("kv_move", (src, dst)), ("ping", None), and finally ("stop", None).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import torch

from ember.distributed.launch import close_ranks, init_ranks, rank_device

logger = logging.getLogger(__name__)


def recv_message(control) -> tuple[str, object]:
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def build_rank_runner(cfg, rank: int, world_size: int, init_method: str, local_rank: int):
    """Join the ranks and build this rank's ModelRunner on its shard -> (runner, control group)."""
    from ember.checkpoint import load_checkpoint, resolve_checkpoint_path
    from ember.worker.device import resolve_device, resolve_dtype
    from ember.worker.model_runner import ModelRunner

    device = rank_device(resolve_device(cfg.ember.device), local_rank)
    dtype = resolve_dtype(cfg.ember.dtype, device)
    set_rank_threads(cfg, world_size, device)
    ctx, control = init_ranks(rank, world_size, init_method, device)
    ckpt = load_checkpoint(resolve_checkpoint_path(cfg.trt_llm.build.checkpoint_repository))
    return ModelRunner(ckpt, dtype, device, cfg.ember.block_size, ctx), control


def set_rank_threads(cfg, world_size: int, device: torch.device) -> None:
    """CPU ranks on one machine share its cores: each takes its share unless ember.num_threads says."""
    if cfg.ember.num_threads:
        torch.set_num_threads(cfg.ember.num_threads)
    elif device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


@torch.inference_mode()
def serve_steps(runner, control) -> None:
    """The worker loop: mirror rank 0's forwards and KV moves until ("stop", None)."""
    from ember.spec.tree import copy_kv_slots

    while True:
        kind, payload = recv_message(control)
        if kind == "forward":
            runner.forward(payload)
        elif kind == "kv_move":
            copy_kv_slots(runner.kv_caches, *payload)
        elif kind == "kv":
            runner.allocate_kv_cache(payload)
        elif kind == "stop":
            return
        # "ping": rank 0 checking that the workers are still there


def run_worker(cfg, rank: int, world_size: int, init_method: str, local_rank: int, parent_pid: int | None = None):
    """Entry point of a worker rank (a spawned process, or `ember serve` under torchrun with RANK > 0)."""
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if parent_pid is not None:  # spawned: never outlive the engine process, even if it is killed
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        runner, control = build_rank_runner(cfg, rank, world_size, init_method, local_rank)
        serve_steps(runner, control)
    except Exception as exc:  # noqa: BLE001 - rank 0 sees the broken group; say why here
        print(f"ember tensor-parallel worker rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        os._exit(1)
    close_ranks()


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)
