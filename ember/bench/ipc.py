"""The per-message cost of the front end <-> engine core channel: a step's outputs message (deltas for B
sequences plus stats) sent to a child process and echoed back, through the channel ember uses (a
multiprocessing Connection over a Unix socket pair, pickle) and through multiprocessing.Queue, in alternating
rounds (median of 8).

    python -m ember.bench.ipc [--batch 32] [--num 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import socket
import statistics
import time
from multiprocessing.connection import Connection

from ember.engine.messages import EngineCoreOutput, EngineCoreOutputs, EngineStats
from ember.outputs import TokenLogprob


def sample_message(batch: int) -> EngineCoreOutputs:
    outs = [EngineCoreOutput(f"cmpl-{i:032x}", [1234], [TokenLogprob(1234, -0.25, [(1234, -0.25)])], num_cached_tokens=16)
            for i in range(batch)]
    return EngineCoreOutputs(outs, [], EngineStats(num_running=batch, num_blocks=4096, num_free_blocks=4000))


def _echo_conn(fd: int, other_fd: int) -> None:
    os.close(other_fd)  # the parent's end, inherited by fork: closed so that the parent's close is an EOF here
    conn = Connection(fd)
    try:
        while True:
            conn.send(conn.recv())
    except EOFError:
        pass


def _echo_queue(inq, outq) -> None:
    while (msg := inq.get()) is not None:
        outq.put(msg)


def time_connection(msg, num: int) -> float:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = mp.get_context("fork").Process(target=_echo_conn, args=(child.fileno(), parent.fileno()))
    proc.start()
    child.close()
    conn = Connection(parent.detach())
    conn.send(msg), conn.recv()  # warm
    t0 = time.perf_counter()
    for _ in range(num):
        conn.send(msg)
        conn.recv()
    elapsed = time.perf_counter() - t0
    conn.close()
    proc.join()
    return elapsed / num


def time_queue(msg, num: int) -> float:
    ctx = mp.get_context("fork")
    inq, outq = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_echo_queue, args=(inq, outq))
    proc.start()
    inq.put(msg), outq.get()
    t0 = time.perf_counter()
    for _ in range(num):
        inq.put(msg)
        outq.get()
    elapsed = time.perf_counter() - t0
    inq.put(None)
    proc.join()
    return elapsed / num


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num", type=int, default=2000)
    args = p.parse_args(argv)
    msg = sample_message(args.batch)
    size = len(pickle.dumps(("outputs", msg), protocol=pickle.HIGHEST_PROTOCOL))
    # alternating rounds, median of each: the machine's load drifts, and both channels should see the same drift
    rounds = [(time_connection(("outputs", msg), args.num // 8), time_queue(("outputs", msg), args.num // 8))
              for _ in range(8)]
    conn_s, queue_s = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
    print(f"message: {args.batch} sequences, {size} bytes pickled")
    print(f"Connection over a socket pair: {conn_s * 1e6:.1f} us per round trip")
    print(f"multiprocessing.Queue:         {queue_s * 1e6:.1f} us per round trip ({queue_s / conn_s:.2f}x)")
    return {"bytes": size, "connection_us": conn_s * 1e6, "queue_us": queue_s * 1e6}


if __name__ == "__main__":
    main()
