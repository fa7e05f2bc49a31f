"""Typed API errors and the single place where every failure becomes an OpenAI error object.

`{"error": {"message", "type", "param", "code"}}` — never a stack trace or a file path.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lanner.api")

# The metrics of the model a request resolved to (set by `serving.get_model`), so the handlers below can
# count the failure under its model. Requests that never named a known model are not counted per model.
current_model_metrics: ContextVar[Any] = ContextVar("current_model_metrics", default=None)

_FAILURE_REASON = {429: "rejected", 408: "timeout", 504: "timeout", 503: "unavailable"}


def failure_reason(status: int) -> str:
    return _FAILURE_REASON.get(status, "engine_error" if status >= 500 else "invalid_request")


def count_failure(status: int, metrics: Any = None) -> None:
    metrics = metrics if metrics is not None else current_model_metrics.get()
    if metrics is not None and status >= 400:
        metrics.fail(failure_reason(status))


class APIError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers


class InvalidRequestError(APIError):
    pass


class ContextLengthExceededError(APIError):
    code = "context_length_exceeded"


class ModelNotFoundError(APIError):
    status_code = 404
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", param="model")


class AuthenticationError(APIError):
    status_code = 401
    code = "invalid_api_key"

    def __init__(self, message: str = "Incorrect or missing API key.") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ServiceUnavailableError(APIError):
    status_code = 503
    type = "service_unavailable"


class RateLimitError(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "queue_full"


class DeadlineExceededError(APIError):
    status_code = 504
    type = "timeout_error"
    code = "request_timeout"


class EngineFailureError(APIError):
    status_code = 500
    type = "server_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=exc.headers,
    )


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'.

    Pydantic appends union-member tags (e.g. 'str', 'list[int]') to the location; stop at the first
    element that isn't a field name or an index.
    """
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and p.isidentifier():
            out += f".{p}" if out else p
        else:
            break
    return out or None


_FIELD_PATH = re.compile(r"^[A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_]\w*)*$")


def _validation_message(err: dict[str, Any], param: str | None) -> tuple[str, str | None]:
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if err.get("type") in ("model_type", "model_attributes_type", "dict_type") and not param:
        return "The request body must be a JSON object.", None
    if err.get("type") == "finite_number":
        return f"{param}: NaN and Infinity are not allowed.", param
    # Errors raised by our validators start with "Value error, <field>: ..." for unsupported fields.
    msg = msg.removeprefix("Value error, ")
    head, sep, rest = msg.partition(": ")
    if sep and _FIELD_PATH.match(head):
        if param and not head.startswith(param):  # a nested model's validator names its own field
            head = f"{param}.{head}"
            return f"{head}: {rest}", head
        return msg, head
    return (f"{param}: {msg}" if param else msg), param


def invalid_request_from(errors: list[dict[str, Any]]) -> InvalidRequestError:
    """A 400 for pydantic errors raised outside request parsing (a model built from a validated body)."""
    err = errors[0] if errors else {}
    message, param = _validation_message(err, _param_from_loc(tuple(err.get("loc", ()))))
    return InvalidRequestError(message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        count_failure(exc.status_code)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        err = errors[0] if errors else {}
        param = _param_from_loc(tuple(err.get("loc", ())))
        message, param = _validation_message(err, param)
        return JSONResponse(error_body(message, "invalid_request_error", param, None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(error_body(detail, type_, None, code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        count_failure(500)
        return JSONResponse(error_body("Internal server error.", "server_error", None, None), status_code=500)
