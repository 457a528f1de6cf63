"""uvicorn on a thread over a pre-bound loopback socket, for tests that talk HTTP to an app: connections queue
on the socket until uvicorn accepts them, so nothing polls for readiness. Used with a fake engine
(tests/server) and with the real one (tests/e2e)."""

from __future__ import annotations

import contextlib
import socket
import threading

from ember.server.app import build_server


class LiveServer:
    def __init__(self, app, stop_timeout_s: float = 20.0):
        self.stop_timeout_s = stop_timeout_s
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = build_server(app, "127.0.0.1", self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.stop_timeout_s)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@contextlib.contextmanager
def running(server: LiveServer):
    """Start `server`, yield it, and stop it unless the test already did."""
    server.thread.start()
    try:
        yield server
    finally:
        if server.thread.is_alive():
            server.stop()
