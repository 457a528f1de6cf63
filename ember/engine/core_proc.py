"""The engine-core process: `python -m ember.engine.core_proc FD`. Started by the API server
(ember.engine.core_client.ProcessCoreClient), never by re-importing the user's `__main__`.

Its config arrives pickled on stdin (the EngineConfig, explicit: nothing is read from the environment),
FD is its end of a socket pair with the front end. It builds the EngineCore, says ("ready", EngineInfo)
(or ("dead", reason) if it cannot start), then runs the busy loop until the front end says "stop" or goes
away. SIGINT/SIGTERM are the front end's to handle (it drains, then stops the core), so they are ignored.
"""

from __future__ import annotations

import logging
import pickle
import signal
import sys
from multiprocessing.connection import Connection


def _recv_from(conn: Connection):
    def recv(timeout: float | None) -> list:
        msgs = []
        if conn.poll(timeout):
            msgs.append(conn.recv())
            while conn.poll(0):  # coalesce whatever else arrived
                msgs.append(conn.recv())
        return msgs

    return recv


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(int(argv[0]))
    cfg = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")

    def send(kind: str, payload) -> None:
        conn.send((kind, payload))

    from ember.engine.core import EngineCore
    from ember.engine.core_loop import CoreLoop

    try:
        core = EngineCore(cfg)
    except BaseException as exc:  # noqa: BLE001 - the front end reports it and exits
        logging.getLogger(__name__).exception("the engine core could not start")
        send("dead", f"the engine core could not start: {type(exc).__name__}: {exc}")
        return 1
    send("ready", core.info())
    try:
        CoreLoop(core, _recv_from(conn), send).run()
    except BaseException:  # noqa: BLE001 - already reported as ("dead", reason)
        _linger(conn)
        return 1
    finally:
        core.shutdown()
    return 0


def _linger(conn: Connection, timeout_s: float = 10.0) -> None:
    """After ("dead", reason), wait for the front end to read it and hang up, so that its reason (e.g. which
    tensor-parallel rank died) and not just this process's exit is what the server reports."""
    try:
        while conn.poll(timeout_s):
            conn.recv()
    except (EOFError, OSError):
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
