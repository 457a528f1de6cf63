"""A dead engine ends the server process even when the orderly stop hangs (e.g. a lifespan hook blocked on a
collective with a lost rank): the watchdog exits hard with status 1 and names the reason."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import threading, time
    from ember.server import app

    class Engine:
        def __init__(self):
            self.t0 = time.monotonic()
        def dead_reason(self):
            return "worker rank 1 exited with code -9" if time.monotonic() - self.t0 > 0.3 else None

    class Server:
        should_exit = False

    app.DEAD_EXIT_GRACE_S = 0.5
    server = Server()
    threading.Thread(target=app._exit_when_engine_dies, args=(Engine(), server, 0.05), daemon=True).start()
    while True:  # an orderly stop that never finishes
        time.sleep(0.05)
        if server.should_exit:
            print("stop requested", flush=True)
            time.sleep(3600)
""")


def test_watchdog_exits_hard_when_the_stop_hangs():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)  # hangs without the hard exit
    assert proc.returncode == 1, proc.stderr
    assert "stop requested" in proc.stdout  # the orderly stop was asked for first
    assert "the engine died, so the server exited: worker rank 1 exited with code -9" in proc.stderr
