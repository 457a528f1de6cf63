"""The EngineCore's busy loop, shared by the core process (ember.engine.core_proc) and the in-process
thread (ember.engine.core_client.ThreadCoreClient): take what the front end sent, step, send the deltas.

Messages are (kind, payload) tuples. Front end -> core: ("add", [EngineCoreRequest]), ("abort", [ids]),
("call", (call_id, method, args)) for control (run-time LoRA), ("stop", None). Core -> front end:
("outputs", EngineCoreOutputs) after every step or input that changed something, ("reply", (call_id,
ErrorInfo or None, value)), ("dead", reason) once when the core can no longer run.
"""

from __future__ import annotations

import logging
from typing import Callable

from ember.engine.core import EngineCore
from ember.engine.messages import EngineCoreOutputs, ErrorInfo
from ember.errors import EmberError

logger = logging.getLogger(__name__)

HEALTH_POLL_S = 0.5  # with worker ranks, how often the idle loop checks they are alive
_CALLS = ("add_lora", "remove_lora")  # control methods the front end may call


class CoreLoop:
    def __init__(self, core: EngineCore, recv: Callable[[float | None], list], send: Callable[[str, object], None]):
        self.core = core
        self.recv = recv  # recv(timeout): the messages waiting (blocks up to timeout for the first; None: forever)
        self.send = send
        self.errors: list = []  # (request id, ErrorInfo) refused since the last send
        self.is_changed = False  # an input changed state the front end sees (stats) since the last send

    def run(self) -> None:
        """Until ("stop") or the front end goes away (recv raises EOFError). A dying core says why first."""
        core = self.core
        try:
            self.send("outputs", EngineCoreOutputs([], [], core.stats()))  # the front end's stats are valid from the start
            while True:
                idle = not core.has_unfinished_requests()
                for kind, payload in self.recv((HEALTH_POLL_S if core.has_workers else None) if idle else 0):
                    if kind == "stop":
                        return
                    self.handle(kind, payload)
                if core.has_workers:
                    core.check_health()  # raises when a tensor-parallel worker rank is gone
                outputs = core.step() if core.has_unfinished_requests() else []
                if outputs or self.errors or self.is_changed:
                    self.send("outputs", EngineCoreOutputs(outputs, self.errors, core.stats()))
                    self.errors, self.is_changed = [], False
        except EOFError:
            return
        except BaseException as exc:
            logger.exception("the engine core loop died")
            reason = getattr(exc, "message", None) or f"the engine core loop died: {type(exc).__name__}: {exc}"
            try:
                self.send("dead", reason)
            except Exception:  # noqa: BLE001 - the front end may be gone too
                pass
            raise

    def handle(self, kind: str, payload) -> None:
        core = self.core
        self.is_changed = True
        if kind == "add":
            for req in payload:
                try:
                    core.add_request(req)
                except EmberError as exc:
                    self.errors.append((req.request_id, ErrorInfo.of(exc)))
        elif kind == "abort":
            core.abort_requests(payload)
        elif kind == "call":
            call_id, method, args = payload
            if method not in _CALLS:
                self.send("reply", (call_id, ErrorInfo("EmberError", f"unknown control call {method!r}"), None))
                return
            try:
                value = getattr(core, method)(*args)
            except Exception as exc:  # noqa: BLE001 - the caller hears it (e.g. a bad adapter: a 400)
                self.send("reply", (call_id, ErrorInfo(type(exc).__name__, str(exc)), None))
            else:
                self.send("reply", (call_id, None, value))
        else:
            raise ValueError(f"unknown message kind {kind!r}")
