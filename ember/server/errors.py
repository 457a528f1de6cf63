"""OpenAI's error shape, everywhere: `{"error": {"message", "type", "param", "code"}}`.

Every way a request can fail ends here: ember's own errors (ember/errors.py plus the server-only ones
below), FastAPI/pydantic validation errors (400 naming the field), Starlette's 404/405, and anything
unexpected (a 500 whose message leaks nothing). `install_error_handlers(app)` wires them in."""

from __future__ import annotations

import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.errors import EmberError, InvalidRequestError, QueueFullError, RequestTimeoutError  # noqa: F401

logger = logging.getLogger("ember.server")


class AuthenticationError(EmberError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PayloadTooLargeError(EmberError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class ServiceUnavailableError(EmberError):
    """The server is draining (SIGTERM) or the engine loop died."""

    status_code = 503
    error_type = "service_unavailable"
    code = "service_unavailable"


class NotSupportedError(InvalidRequestError):
    """A valid OpenAI field that ember does not serve yet (a 400, never a 500)."""

    code = "not_supported"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status: int, message: str, error_type: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status, headers=headers)


def ember_error_body(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for any exception; unknown ones become an opaque 500."""
    if isinstance(exc, EmberError):
        return exc.status_code, error_body(exc.message, exc.error_type, exc.param, exc.code)
    if isinstance(exc, ValidationError):
        return 400, validation_error_body(exc.errors())
    logger.error("unexpected error while serving a request", exc_info=exc)
    return 500, error_body("The server had an error while processing your request.", "internal_error", None, "internal_error")


def ember_error_response(exc: BaseException) -> JSONResponse:
    status, body = ember_error_body(exc)
    headers = None
    if isinstance(exc, QueueFullError):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error_body(errors: list[dict]) -> dict:
    """The first pydantic error as an OpenAI 400: param is the dotted field path ("messages.0.role")."""
    if not errors:
        return error_body("The request body is invalid.", "invalid_request_error")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # drop pydantic's union-member tags ("str", "list[int]", "function-after[...]") from the path
    loc = [p for p in loc if not _is_union_tag(p)]
    param = ".".join(loc) or None
    if err.get("type") in ("json_invalid", "json_type"):
        msg = "We could not parse the JSON body of your request. The body must be a valid JSON object."
        return error_body(msg, "invalid_request_error", None, "invalid_json")
    if err.get("type") == "missing":
        return error_body(f"Missing required parameter: '{param}'.", "invalid_request_error", param, "missing_required_parameter")
    detail = str(err.get("msg", "is invalid"))
    value = err.get("input")
    shown = _short_repr(value)
    msg = f"Invalid value for '{param}'{shown}: {detail}." if param else f"Invalid request: {detail}."
    return error_body(msg, "invalid_request_error", param, "invalid_value")


def _is_union_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list", "dict") or "[" in part or part.startswith("function-")


def _short_repr(value) -> str:
    if isinstance(value, (dict, list)):
        return ""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return ""
    return f" ({text})" if len(text) <= 64 else ""


_STATUS_MESSAGES = {
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EmberError)
    async def _ember(_request: Request, exc: EmberError):
        return ember_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        return JSONResponse(validation_error_body(list(exc.errors())), status_code=400)

    @app.exception_handler(ValidationError)
    async def _pydantic(_request: Request, exc: ValidationError):
        return JSONResponse(validation_error_body(exc.errors()), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        error_type, code = _STATUS_MESSAGES.get(exc.status_code, ("invalid_request_error", None))
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}."
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, error_type, None, code, headers=getattr(exc, "headers", None))
