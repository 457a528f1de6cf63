"""The front end's handle on an EngineCore: `ProcessCoreClient` runs it as its own program (the server),
`ThreadCoreClient` on a thread of this process (an in-process LLMEngine handed to AsyncLLM, e.g. in tests).
Both speak the messages of ember.engine.core_loop and deliver the core's messages on the event loop.

IPC: a multiprocessing `Connection` over a Unix socket pair (pickle, length-prefixed frames). Measured with
`python -m ember.bench.ipc --num 4000` (a step's message for 32 sequences, 4.3 KB pickled, echoed by a child; 8
alternating rounds, medians) on this 2-core machine under a load average of ~20: 393 us per round trip, against
696 us through a multiprocessing.Queue (1.8x; single runs ranged 0.3-0.8 ms and 0.3-2.2 ms). Both are small beside
a decode step (30 ms quiet, seconds under that load), so the deciding reasons are structural: the socket's fd lets
the event loop wait on it (`add_reader`, no reader thread contending for the server's GIL), it needs no feeder
thread on either side, and no new dependency (pyzmq/msgspec are not installed here).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Callable

from ember.engine.core_loop import CoreLoop
from ember.engine.messages import EngineInfo
from ember.errors import EngineDeadError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # loading (and packing) a model can take minutes on a busy CPU
STOP_TIMEOUT_S = 20.0  # for the core to finish its step, stop its ranks and exit before it is killed


class ProcessCoreClient:
    """Starts `python -m ember.engine.core_proc` with the config on stdin and waits for it to be ready."""

    def __init__(self, cfg):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen([sys.executable, "-m", "ember.engine.core_proc", str(child.fileno())],
                                     stdin=subprocess.PIPE, pass_fds=(child.fileno(),))
        child.close()
        self.conn = Connection(parent.detach())
        self._dead: str | None = None
        self._on_message: Callable | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            self.proc.stdin.write(pickle.dumps(cfg))
            self.proc.stdin.close()
            self.info: EngineInfo = self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self) -> EngineInfo:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.conn.poll(0.5):
                try:
                    kind, payload = self.conn.recv()
                except EOFError:
                    break
                if kind == "ready":
                    return payload
                raise EngineDeadError(str(payload))
            if self.proc.poll() is not None:
                break
        else:
            raise EngineDeadError(f"the engine core process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            self.proc.wait(10)  # it closed its end: let its exit code name what happened (its log is on stderr)
        except subprocess.TimeoutExpired:
            pass
        raise EngineDeadError(self._exit_reason() or "the engine core process closed its socket while starting")

    def _exit_reason(self) -> str | None:
        rc = self.proc.poll()
        return None if rc is None else f"the engine core process (pid {self.proc.pid}) exited with code {rc}"

    def start(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[str, object], None]) -> None:
        """From now on the core's messages go to `on_message` on `loop` (one reader: the socket's fd)."""
        self._loop, self._on_message = loop, on_message
        loop.add_reader(self.conn.fileno(), self._read)

    def _read(self) -> None:
        try:
            while self.conn.poll():  # everything that arrived, in order
                kind, payload = self.conn.recv()
                if kind == "dead":
                    self._dead = str(payload)
                self._on_message(kind, payload)
        except (EOFError, OSError):
            self._loop.remove_reader(self.conn.fileno())
            try:
                self.proc.wait(2)  # its socket closed as it died: its exit code says how
            except subprocess.TimeoutExpired:
                pass
            self._dead = self._dead or self._exit_reason() or "the engine core process closed its socket"
            self._on_message("dead", self._dead)

    def send(self, kind: str, payload) -> None:
        if self._dead is None:
            try:
                self.conn.send((kind, payload))
            except OSError:  # the core is gone; the reader reports it
                pass

    def dead_reason(self) -> str | None:
        """Safe from any thread (the server's watchdog polls it)."""
        return self._dead or self._exit_reason()

    async def close(self) -> None:
        if self._loop is not None and not self.conn.closed:
            self._loop.remove_reader(self.conn.fileno())
        if self.proc.poll() is None:
            self.send("stop", None)
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("the engine core did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self.conn.closed:
            self.conn.close()


class ThreadCoreClient:
    """An in-process EngineCore (an LLMEngine's) driven by the same loop on a background thread."""

    def __init__(self, engine):
        self.engine = engine
        self.info: EngineInfo = engine.core.info()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._dead: str | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[str, object], None]) -> None:
        def send(kind: str, payload) -> None:
            if kind == "dead":
                self._dead = str(payload)
            loop.call_soon_threadsafe(on_message, kind, payload)

        def run() -> None:
            try:
                CoreLoop(self.engine.core, self._recv, send).run()
            except BaseException:  # noqa: BLE001 - reported through ("dead", reason)
                pass

        self._thread = threading.Thread(target=run, name="ember-engine-core", daemon=True)
        self._thread.start()

    def _recv(self, timeout: float | None) -> list:
        msgs = []
        try:
            msgs.append(self._inbox.get(timeout=timeout) if timeout != 0 else self._inbox.get_nowait())
        except queue.Empty:
            return msgs
        while True:
            try:
                msgs.append(self._inbox.get_nowait())
            except queue.Empty:
                return msgs

    def send(self, kind: str, payload) -> None:
        self._inbox.put((kind, payload))

    def dead_reason(self) -> str | None:
        if self._dead is not None:
            return self._dead
        if self._thread is not None and not self._thread.is_alive():
            return "the engine core loop has stopped"
        return self.engine.dead_reason()

    async def close(self) -> None:
        self.send("stop", None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
