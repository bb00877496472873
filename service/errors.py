"""HTTP error answers: every one has OpenAI's body (``steer.service.protocol.error_body``).

The exception handlers turn what a request can raise into that body: a ``ServingError`` (user
errors found by the serving layer), FastAPI's validation error (named by the field it is about),
Starlette's HTTP errors (404, 405) and anything unexpected (500, logged). The errors that the app,
its middleware and the NPC routes share are built here once.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steer.service.protocol import error_body
from steer.service.serving import ServingError

logger = logging.getLogger(__name__)

INVALID_API_KEY = "missing or invalid API key: send 'Authorization: Bearer KEY'"


class ErrorJSONResponse(JSONResponse):
    """Error bodies escape non-ASCII: a message may quote the request's own text, which can hold a
    lone surrogate that UTF-8 cannot encode (JSON's "\\ud800" escape is the only way to send it back)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return ErrorJSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def invalid_api_key() -> ServingError:
    return ServingError(401, INVALID_API_KEY, type="authentication_error", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})


def model_not_ready(load_error: str | None = None) -> ServingError:
    detail = f"the model failed to load ({load_error})" if load_error else "the model is loading"
    return ServingError(503, f"{detail}; retry shortly", type="server_error", code="model_not_ready",
                        headers={"Retry-After": "5"})


def as_response(e: ServingError) -> JSONResponse:
    """For ASGI middleware, which answers without going through the exception handlers."""
    return ErrorJSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ------------------------------------------------------------------ exception handlers
async def serving_error(request: Request, e: ServingError) -> JSONResponse:
    return as_response(e)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    first = errors[0] if errors else {}
    param = _param_from_loc(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                              code="invalid_json")
    if param is None:
        return error_response(400, "the request body must be a JSON object (Content-Type: application/json)",
                              code="invalid_body")
    message = f"{param}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return error_response(400, message, param=param, code="invalid_value")


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    types = {401: "authentication_error", 404: "not_found_error"}
    return error_response(e.status_code, str(e.detail), type=types.get(e.status_code, "invalid_request_error"),
                          headers=getattr(e, "headers", None))


async def unexpected_error(request: Request, e: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal server error", type="server_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*|[A-Z]\w*)$")


def _param_from_loc(loc) -> str | None:
    # pydantic names union members in the location ("content.str"); the client only needs the field.
    parts = [str(p) for p in loc if p != "body" and not _UNION_MEMBER.match(str(p))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None
