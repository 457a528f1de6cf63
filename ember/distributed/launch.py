"""Starting the tensor-parallel ranks on torch.distributed.

Two ways in. On one machine `ember` starts the worker ranks itself as programs of their own
(`python -m ember.distributed.worker`, see ember.distributed.spawn) and rendezvouses through a TCP store on
loopback that rank 0 hosts. Across machines a launcher starts every rank (torchrun, or anything that sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT): `cli.py` reads those variables into a `RankEnv`
(the only place they are read) and every rank runs `ember serve`; ranks > 0 become workers.

Two process groups: the default one (NCCL on GPUs, gloo on CPU) carries the layers' tensors and has a
finite timeout (a hung rank ends the step with an error instead of a hang); a gloo "control" group
carries rank 0's pickled step messages and waits indefinitely, so idle workers never time out.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch

from ember.distributed.parallel import ParallelContext

TENSOR_TIMEOUT_S = 300  # a collective of one step that takes longer means a rank is stuck
CONTROL_TIMEOUT_S = 365 * 24 * 3600  # workers wait for the next step for as long as the server is idle


@dataclass(frozen=True)
class RankEnv:
    """Where this process sits in a multi-process launch (the standard torchrun variables)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


def rank_env_from(environ) -> RankEnv | None:
    """The launcher's variables, or None when this process was not started by one (or alone)."""
    if "RANK" not in environ or int(environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return RankEnv(rank=int(environ["RANK"]), world_size=int(environ["WORLD_SIZE"]),
                   local_rank=int(environ.get("LOCAL_RANK", environ["RANK"])),
                   master_addr=environ.get("MASTER_ADDR", "127.0.0.1"), master_port=int(environ.get("MASTER_PORT", "29500")))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """Each rank's own GPU (cuda:local_rank); CPU ranks share the CPU."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def check_world_size(world_size: int, device: torch.device, *, local_world_size: int | None = None) -> None:
    """tensor_parallel_count against the devices here: one GPU per rank; on CPU, gloo processes are allowed."""
    if device.type == "cuda":
        have = torch.cuda.device_count()
        need = local_world_size or world_size
        if need > have:
            raise ValueError(f"trt_llm.build.tensor_parallel_count={world_size} needs {need} GPUs on this machine, "
                             f"but {have} are visible")


def parallel_context(rank: int, world_size: int, device: torch.device, expert_parallel_size: int = 1) -> ParallelContext:
    """This rank's context on the default group (usable to build and load the model before the group exists).
    expert_parallel_size: build.moe_expert_parallel_option (-1: 1, every expert on every rank)."""
    return ParallelContext(rank=rank, world_size=world_size, group=None, reduce_in_fp32=device.type != "cuda",
                           expert_parallel_size=max(1, expert_parallel_size))


def bind_device(device: torch.device) -> None:
    """Make a rank's GPU the current one before anything is allocated on it."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def init_ranks(rank: int, world_size: int, init_method: str | None, device: torch.device,
               store=None) -> tuple[ParallelContext, object]:
    """Join the process groups (blocks until every rank has joined) -> (this rank's context, control group).
    The rendezvous is `init_method` (a URL, or the launcher's env://) or an already connected `store`."""
    import torch.distributed as dist

    if not dist.is_initialized():
        init_default_group(rank, world_size, init_method, device, store=store)
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT_S))
    return parallel_context(rank, world_size, device), control


def init_default_group(rank: int, world_size: int, init_method: str | None, device: torch.device,
                       store=None) -> None:
    """The tensor group: NCCL between GPUs, gloo between CPU processes."""
    import torch.distributed as dist

    bind_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, store=store,
                            rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=TENSOR_TIMEOUT_S))


def join_launch(cfg, env: RankEnv) -> bool:
    """`ember serve` started by torchrun (or a similar launcher): rank 0 joins the group and goes on to serve
    (the executor finds the group initialized and spawns nothing); a rank > 0 runs the worker loop here until
    rank 0 stops it. Returns True when this process was a worker and is done."""
    from ember.worker.device import resolve_device

    if env.world_size != cfg.trt_llm.build.tensor_parallel_count:
        raise ValueError(f"the launcher started {env.world_size} ranks but trt_llm.build.tensor_parallel_count is "
                         f"{cfg.trt_llm.build.tensor_parallel_count}; they must match")
    if env.rank > 0:
        from ember.distributed.worker import run_worker

        run_worker(cfg, env.rank, env.world_size, env.init_method, env.local_rank)
        return True
    init_default_group(0, env.world_size, env.init_method, rank_device(resolve_device(cfg.ember.device),
                                                                        env.local_rank))
    return False


def close_ranks() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
