"""Errors a caller can cause or observe, shared by the engine and the server (which maps them to
OpenAI's error shape). Each message is one sentence naming the field and the limit."""

from __future__ import annotations


class EmberError(Exception):
    """Base class. `param` names the request field at fault, `code` is OpenAI's error code."""

    status_code = 500
    error_type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(EmberError, ValueError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(EmberError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class QueueFullError(EmberError):
    """The waiting queue is at its bound; the client should retry after `retry_after` seconds."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(EmberError):
    """The deadline a client set (Request-Timeout-Ms / X-Request-Timeout) passed first; the request was aborted."""

    status_code = 408
    error_type = "timeout_error"
    code = "request_timeout"


class EngineDeadError(EmberError):
    status_code = 503
    error_type = "service_unavailable"
    code = "engine_dead"


class ConfigError(ValueError):
    """An invalid config; the message names the field, the value and what is allowed."""


class WorkerStartError(RuntimeError):
    """A tensor-parallel worker rank could not start (the message names the rank and its last error lines)."""
