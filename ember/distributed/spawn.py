"""Rank 0 starts the worker ranks of one machine as programs of their own and watches them start.

Each worker is `python -m ember.distributed.worker` (a subprocess, never a re-import of the user's
`__main__`, so `LLM(tensor_parallel_count=2)` works from stdin, an unguarded script or a notebook). It gets the
rendezvous address and its rank on the command line and the validated config as JSON on stdin.

Start-up handshake over the TCP store that rank 0 hosts: every worker connects, loads its shard, and sets
`ember/ready/<rank>`; only then do the ranks build their process groups. Rank 0 polls the store and its
workers' exit codes while it waits, so a worker that dies (an import error, a missing checkpoint, out of
memory) fails the start within a fraction of a second with that rank and the last lines it wrote to stderr,
instead of a rendezvous timeout that names neither.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ember.errors import WorkerStartError

STARTUP_TIMEOUT_S = 1800  # a worker still loading its shard after this long is taken to be stuck
STDERR_TAIL_LINES = 12  # the last lines of a worker's stderr quoted when it fails


def ready_key(rank: int) -> str:
    return f"ember/ready/{rank}"


class WorkerProcess:
    """One worker rank's process: its exit code, and its stderr (passed through to ours, the tail kept)."""

    def __init__(self, rank: int, popen: subprocess.Popen):
        self.rank = rank
        self.popen = popen
        self.pid = popen.pid
        self._tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._reader = threading.Thread(target=self._pump, name=f"ember-tp-rank{rank}-stderr", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.popen.stderr:  # ends at EOF, when the worker exits
            self._tail.append(line.rstrip("\n"))
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):  # our stderr closed: keep the tail anyway
                pass

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()

    def stderr_tail(self, wait_s: float = 2.0) -> str:
        """The last lines the worker wrote (all of them once it has exited and the pipe is drained)."""
        if self.popen.poll() is not None:
            self._reader.join(wait_s)
        return "\n".join(self._tail)

    def failure(self) -> str:
        """Why the worker could not start: its rank, exit code and last error line, then its last output."""
        tail = self.stderr_tail()
        last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
        last = last.removeprefix(f"ember tensor-parallel worker rank {self.rank}: ")  # the worker's own last word
        head = f"tensor-parallel worker rank {self.rank} (pid {self.pid}) exited with code {self.exitcode} during start-up"
        return f"{head}: {last}\n--- its last output ---\n{tail}" if last else f"{head}, without output"


def worker_command(rank: int, world_size: int, master_addr: str, master_port: int, local_rank: int) -> list[str]:
    return [sys.executable, "-m", "ember.distributed.worker", "--rank", str(rank), "--world-size", str(world_size),
            "--master-addr", master_addr, "--master-port", str(master_port), "--local-rank", str(local_rank),
            "--parent-pid", str(os.getpid())]


def start_workers(cfg, world_size: int, master_addr: str, master_port: int) -> list[WorkerProcess]:
    """Start ranks 1..world_size-1 on this machine; each reads `cfg` (as JSON) from its stdin."""
    config_json = json.dumps(cfg.model_dump(mode="json"))
    # the workers import the same ember as this process, wherever it was imported from
    ember_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ember_root, env.get("PYTHONPATH")) if p)
    workers = []
    try:
        for rank in range(1, world_size):
            popen = subprocess.Popen(worker_command(rank, world_size, master_addr, master_port, rank),
                                     stdin=subprocess.PIPE, stdout=None, stderr=subprocess.PIPE, env=env, text=True,
                                     start_new_session=False)
            workers.append(WorkerProcess(rank, popen))
            try:
                popen.stdin.write(config_json)
                popen.stdin.close()
            except BrokenPipeError:  # it died already; wait_for_workers reports why
                pass
    except BaseException:
        stop_workers(workers, graceful=False)
        raise
    return workers


def host_store(world_size: int, timeout_s: float):
    """Rank 0's TCP store on a free loopback port (the rendezvous of one machine's ranks)."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def wait_for_workers(store, workers: list[WorkerProcess], timeout_s: float = STARTUP_TIMEOUT_S,
                     poll_s: float = 0.05) -> None:
    """Block until every worker has loaded its shard; raise WorkerStartError as soon as one exits instead."""
    pending = {w.rank: w for w in workers}
    deadline = time.monotonic() + timeout_s
    while pending:
        for rank, w in list(pending.items()):
            if store.check([ready_key(rank)]):
                del pending[rank]
            elif w.exitcode is not None:
                raise WorkerStartError(w.failure())
        if pending and time.monotonic() > deadline:
            ranks = ", ".join(str(r) for r in sorted(pending))
            raise WorkerStartError(f"tensor-parallel worker rank(s) {ranks} did not finish loading within "
                                   f"{timeout_s:.0f} s")
        if pending:
            time.sleep(poll_s)


def stop_workers(workers: list, graceful: bool) -> None:
    """Wait for workers told to stop (graceful), then kill whatever is still running."""
    for w in workers:
        if graceful:
            w.join(10)
        if w.is_alive():
            w.kill()
            w.join(5)
