"""A worker rank (> 0): loads its shard of the model, holds its shard of the KV cache, and runs whatever
forward passes rank 0 broadcasts, until told to stop. It has no scheduler, tokenizer or sampler.

It is a program of its own: `python -m ember.distributed.worker --rank R --world-size N --master-addr A
--master-port P` with the config as JSON on stdin (started by rank 0, see ember.distributed.spawn), or
`ember serve` under torchrun with RANK > 0.

Messages (rank 0 -> all, on the control group, in order): ("kv", (num_blocks, num_window_blocks)) once, then ("step", (SchedulerOutput,
SpecDecodeMetadata or None, kv moves or None)) per engine step, ("ping", None) while idle, and finally
("stop", None). A step's SchedulerOutput carries deltas only (ember.core.outputs); each rank's runner keeps its
own persistent batch from them, so every rank builds the same inputs. The KV moves are the ones rank 0 made
after verifying the previous step's tree drafts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import threading
import time
import traceback

import torch

from ember.distributed.launch import TENSOR_TIMEOUT_S, bind_device, close_ranks, init_ranks, parallel_context, rank_device

logger = logging.getLogger(__name__)


def recv_message(control) -> tuple[str, object]:
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def build_shard_runner(cfg, rank: int, world_size: int, local_rank: int):
    """This rank's ModelRunner on its shard of the model (no process group needed yet)."""
    from ember.checkpoint import load_checkpoint, resolve_checkpoint_path
    from ember.worker.device import resolve_device, resolve_dtype
    from ember.worker.model_runner import ModelRunner

    device = rank_device(resolve_device(cfg.ember.device), local_rank)
    dtype = resolve_dtype(cfg.ember.dtype, device)
    set_rank_threads(cfg, world_size, device)
    bind_device(device)
    ckpt = load_checkpoint(resolve_checkpoint_path(rank_checkpoint(cfg, rank)))
    parallel = parallel_context(rank, world_size, device, cfg.trt_llm.build.moe_expert_parallel_option)
    return ModelRunner(ckpt, dtype, device, cfg.ember.block_size, parallel, is_deterministic=cfg.ember.deterministic)


def rank_checkpoint(cfg, rank: int):
    """The checkpoint this rank loads: the config's, unless `ember.fault_injection` moves this rank's elsewhere
    (tests use it to make one rank fail at start-up the way a missing or broken shard would)."""
    fault = cfg.ember.fault_injection
    if fault is not None and fault.rank == rank:
        return fault.checkpoint_repository
    return cfg.trt_llm.build.checkpoint_repository


def set_rank_threads(cfg, world_size: int, device: torch.device) -> None:
    """CPU ranks on one machine share its cores: each takes its share unless ember.num_threads says."""
    if cfg.ember.num_threads:
        torch.set_num_threads(cfg.ember.num_threads)
    elif device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


@torch.inference_mode()
def serve_steps(runner, control) -> None:
    """The worker loop: run rank 0's steps until ("stop", None)."""
    while True:
        kind, payload = recv_message(control)
        if kind == "step":
            sched_out, spec, kv_moves = payload
            if kv_moves is not None:
                runner.move_kv(*kv_moves)
            runner.execute(sched_out, spec)
        elif kind == "kv":
            runner.allocate_kv_cache(*payload)  # (num_blocks, num_window_blocks)
        elif kind == "stop":
            return
        # "ping": rank 0 checking that the workers are still there


def run_worker(cfg, rank: int, world_size: int, init_method: str, local_rank: int) -> None:
    """A rank > 0 started by a launcher (torchrun): join the groups, load the shard, serve steps."""
    _log_as(rank)
    try:
        runner = build_shard_runner(cfg, rank, world_size, local_rank)
        _, control = init_ranks(rank, world_size, init_method, runner.device)
        serve_steps(runner, control)
    except Exception as exc:  # noqa: BLE001 - rank 0 sees the broken group; say why here
        _die(rank, exc)
    close_ranks()


def run_spawned_worker(cfg, rank: int, world_size: int, master_addr: str, master_port: int, local_rank: int,
                       parent_pid: int | None) -> None:
    """A rank > 0 started by rank 0 (ember.distributed.spawn): connect to rank 0's store, load the shard, say
    ready, then join the groups and serve steps."""
    import torch.distributed as dist

    from ember.distributed.spawn import ready_key

    _log_as(rank)
    if parent_pid is not None:  # never outlive the engine process, even if it is killed
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        store = dist.TCPStore(master_addr, master_port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=TENSOR_TIMEOUT_S))
        runner = build_shard_runner(cfg, rank, world_size, local_rank)
        store.set(ready_key(rank), "1")
        _, control = init_ranks(rank, world_size, None, runner.device, store=store)
        serve_steps(runner, control)
    except Exception as exc:  # noqa: BLE001 - rank 0 quotes the tail of our stderr
        _die(rank, exc)
    close_ranks()


def _log_as(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")


def _die(rank: int, exc: BaseException) -> None:
    traceback.print_exc(file=sys.stderr)
    print(f"ember tensor-parallel worker rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    os._exit(1)


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """`python -m ember.distributed.worker ...`: the config (EngineConfig as JSON) comes on stdin."""
    p = argparse.ArgumentParser(prog="python -m ember.distributed.worker",
                                description="one tensor-parallel worker rank (started by ember's rank 0)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--local-rank", type=int, required=True)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    try:
        from ember.config.loading import parse_config

        cfg = parse_config(json.loads(sys.stdin.read()))
    except Exception as exc:  # noqa: BLE001
        _die(args.rank, exc)
    run_spawned_worker(cfg, args.rank, args.world_size, args.master_addr, args.master_port, args.local_rank,
                       args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
