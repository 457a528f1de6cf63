"""Executor: the ranks that run the model, and the engine's only way to run a step (`execute`), whatever the
tensor_parallel_count. With 1 it is rank 0's ModelRunner and nothing else (no extra process, no collectives).
With N > 1 it also owns the worker ranks: rank 0 (this process) runs the scheduler and sampler; `execute`
broadcasts the step itself (the SchedulerOutput's deltas, as plain data: no Request objects, no grammar
bitmask) and every rank's runner applies it to its own persistent batch and runs the same forward on its
shard; the vocabulary-parallel logits are gathered to rank 0, which samples. KV moves that rank 0 made after
verifying tree drafts travel with the next step (the other ranks apply them before their forward).

Health: a worker that exits (ranks started here are watched by pid) or stops answering (torchrun ranks, found by
a broken collective or a periodic ping) makes `check_health` raise EngineDeadError, which stops the engine
loop; the server then answers /health with 503 and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import time

import torch

from ember.distributed.launch import (TENSOR_TIMEOUT_S, bind_device, check_world_size, close_ranks, init_ranks,
                                     parallel_context, rank_device)
from ember.distributed.parallel import SINGLE, ParallelContext
from ember.distributed.spawn import host_store, start_workers, stop_workers, wait_for_workers
from ember.distributed.worker import set_rank_threads
from ember.errors import EngineDeadError
from ember.worker.model_runner import ModelRunner, ModelRunnerOutput

logger = logging.getLogger(__name__)

PING_INTERVAL_S = 2.0  # an idle engine checks its worker ranks this often


class StepBroadcaster:
    """Rank 0's end of the worker protocol (see ember.distributed.worker): one broadcast per message."""

    def __init__(self, control):
        self.control = control
        self.num_messages = 0
        self.num_bytes = 0  # pickled message bytes sent (the per-step control traffic)
        self.seconds = 0.0
        self.last_sent = time.monotonic()

    def send(self, kind: str, payload=None) -> None:
        import torch.distributed as dist

        t0 = time.perf_counter()
        msg = (kind, payload)
        self.num_bytes += len(pickle.dumps(msg))
        dist.broadcast_object_list([msg], src=0, group=self.control)
        self.num_messages += 1
        self.seconds += time.perf_counter() - t0
        self.last_sent = time.monotonic()



class Executor:
    def __init__(self, runner: ModelRunner, processes: list | None = None, is_launched: bool = False,
                 control=None):
        self.runner = runner
        self.broadcaster = StepBroadcaster(control) if control is not None else None  # None: one rank
        self.parallel: ParallelContext = runner.parallel
        self.processes = processes or []  # ember.distributed.spawn.WorkerProcess of ranks 1..N-1 (none under torchrun)
        self.is_launched = is_launched  # ranks started by an external launcher (torchrun)
        self._failure: str | None = None
        self._is_closed = False
        self._pending_kv_moves: tuple[list[int], list[int]] | None = None  # rank 0's, for the next broadcast

    @classmethod
    def start(cls, cfg, checkpoint, dtype: torch.dtype, device: torch.device) -> "Executor":
        """Build rank 0's runner; with tensor_parallel_count > 1 start the worker ranks as programs of their own
        (or join the ones a launcher started, when the process group is already initialized) and shard the
        model over them. A worker that fails to start fails this with its rank and last error lines."""
        build = cfg.trt_llm.build
        tp = build.tensor_parallel_count
        if tp == 1:
            return cls(ModelRunner(checkpoint, dtype, device, cfg.ember.block_size,
                                   is_deterministic=cfg.ember.deterministic))
        import torch.distributed as dist

        if build.lora_adapters:
            raise ValueError("trt_llm.build.lora_adapters cannot be combined with tensor_parallel_count > 1 yet; "
                             "use tensor_parallel_count: 1")
        is_launched = dist.is_initialized()
        if is_launched:
            if dist.get_world_size() != tp or dist.get_rank() != 0:
                raise ValueError(f"trt_llm.build.tensor_parallel_count={tp}, but the launcher started "
                                 f"{dist.get_world_size()} ranks; they must match")
        else:
            check_world_size(tp, device)
        device = rank_device(device, 0)
        set_rank_threads(cfg, tp, device)
        store, processes = None, []
        try:
            if not is_launched:  # our own ranks: they load their shards while this one loads its own
                store = host_store(tp, TENSOR_TIMEOUT_S)
                processes = start_workers(cfg, tp, "127.0.0.1", store.port)
            bind_device(device)
            runner = ModelRunner(checkpoint, dtype, device, cfg.ember.block_size, parallel_context(0, tp, device, build.moe_expert_parallel_option),
                                 is_deterministic=cfg.ember.deterministic)
            if not is_launched:
                wait_for_workers(store, processes)
            parallel, control = init_ranks(0, tp, None, device, store=store)
        except BaseException:
            stop_workers(processes, graceful=False)
            close_ranks()
            raise
        logger.info("tensor parallel: %d ranks (%s), %s", tp, "launched" if is_launched else "started here",
                    "gloo, all-reduce in float32" if parallel.reduce_in_fp32 else "nccl")
        return cls(runner, processes, is_launched, control)

    # ---- what the engine calls ------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int, num_window_blocks: int = 0) -> None:
        """Every rank allocates the same number of blocks (rank 0 decides), each with its KV heads
        (num_window_blocks > 0: the sliding layers' own pool, ember.core.window_blocks)."""
        if self.broadcaster is not None:
            self.broadcaster.send("kv", (num_blocks, num_window_blocks))
        self.runner.allocate_kv_cache(num_blocks, num_window_blocks)

    def execute(self, sched_out, spec=None) -> ModelRunnerOutput:
        """Run one step on every rank -> rank 0's sampled tokens. Called for every step, also an empty one
        (it still carries the finished and preempted ids whose rows the runners free)."""
        has_news = sched_out.scheduled or sched_out.finished_ids or sched_out.preempted_ids
        if self.broadcaster is not None and has_news:
            self.broadcaster.send("step", (dataclasses.replace(sched_out, grammar=None), spec, self._pending_kv_moves))
            self._pending_kv_moves = None
        out = self.runner.execute(sched_out, spec)
        if self.broadcaster is not None and out.kv_moves is not None:
            self._pending_kv_moves = out.kv_moves
        return out

    def dead_reason(self) -> str | None:
        """Why the ranks can no longer run the model, or None while they can. Safe from any thread."""
        for rank, p in enumerate(self.processes, start=1):
            if p.exitcode is not None and not self._is_closed:
                return f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
        return self._failure

    def is_alive(self) -> bool:
        return self.dead_reason() is None

    def check_health(self) -> None:
        """Raise EngineDeadError if a rank is gone. Called by the engine thread (it may ping idle workers)."""
        bc = self.broadcaster
        # a spawned rank that exited is known from its exit code: never touch the (broken) group then
        if bc is not None and self.is_alive() and time.monotonic() - bc.last_sent > PING_INTERVAL_S:
            try:
                bc.send("ping")
            except Exception as exc:  # noqa: BLE001 - a broken group means a rank is gone
                self._failure = f"a tensor-parallel worker rank stopped answering ({type(exc).__name__}: {exc})"
                for p in self.processes:  # a killed rank's socket can close just before its exit code shows:
                    p.join(1.0)  # give it a moment, so the reason names the rank and its exit code
                    if p.exitcode is not None:
                        break
        reason = self.dead_reason()
        if reason is not None:
            raise EngineDeadError(f"{reason}; the engine cannot run without all its ranks")

    def shutdown(self) -> None:
        """Stop the worker ranks (asking first when they are healthy) and leave the process group."""
        if self._is_closed or not self.parallel.is_parallel:
            return
        healthy = self.is_alive()
        if healthy and self.broadcaster is not None:
            try:
                self.broadcaster.send("stop")
            except Exception:  # noqa: BLE001
                healthy = False
        self._is_closed = True
        stop_workers(self.processes, graceful=healthy)
        if healthy:
            close_ranks()  # with a rank gone the group cannot be torn down cleanly; the process exits anyway

