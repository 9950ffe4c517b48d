"""One table from domain errors to HTTP, and the error body every failure shares."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.retry import RETRY_HEADER
from app.db import database_unavailable, retriable
from app.logic import errors as e

log = logging.getLogger("nephos.api")

STATUS: dict[type[e.NephosError], int] = {
    e.BadRequest: 400,
    e.Unauthorized: 401,
    e.Forbidden: 403,
    e.NotFound: 404,
    e.AlreadyExists: 409,
    e.TaskPending: 409,
    e.InvalidState: 409,
    e.HostDown: 409,
    e.InUse: 409,
    e.NetworkFull: 409,
    e.Protected: 409,
    e.IdempotencyConflict: 409,
    e.OverLimit: 413,
    e.NoCapacity: 503,
    e.Unavailable: 503,
}

_HTTP_CODES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
}


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorBody(BaseModel):
    error: ErrorDetail


_DESCRIPTIONS = {
    400: "BadRequest: well-formed but invalid",
    401: "Unauthorized: missing or unknown token",
    403: "Forbidden: not allowed for this role",
    404: "NotFound: missing, or not visible to the caller",
    409: "TaskPending, InvalidState, HostDown (host down: only destroy), Protected (EC2 termination or stop "
    "protection is on), InUse, IdempotencyConflict or AlreadyExists",
    413: "OverLimit: quota exceeded",
    422: "ValidationError: the request does not match the schema",
    503: "NoCapacity: no host can take the VM; or Unavailable: the database is restarting (retry after Retry-After)",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the error statuses a route can answer with."""
    # 400 (an unparsable body, a cursor this API did not hand out), 401 and 422 can answer any
    # route, and 503 Unavailable any that reaches the database.
    return {c: {"model": ErrorBody, "description": _DESCRIPTIONS[c]} for c in sorted({400, 401, 422, 503, *codes})}


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": jsonable_encoder(details or {})}}
    return JSONResponse(body, status_code=status, headers=headers)


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method the OpenAPI document gives this request's path."""
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, request.url.path):
            methods |= {m.upper() for m in operations}
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(e.NephosError)
    async def _domain(_: Request, exc: e.NephosError) -> JSONResponse:
        status = next(STATUS[cls] for cls in type(exc).__mro__ if cls in STATUS)  # a subclass: its family's
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return error_response(status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
            for err in exc.errors()
        ]
        first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(422, "ValidationError", f"{where}: {first['msg']}", {"errors": problems})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "Error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names only the methods of the first route that matched the path; the
            # answer names every method the path has (RFC 9110: Allow lists them all).
            headers["Allow"] = ", ".join(allowed_methods(app, request))
        return error_response(exc.status_code, code, str(exc.detail), headers=headers or None)

    @app.exception_handler(sa_exc.DBAPIError)
    @app.exception_handler(OSError)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if retriable(exc):
            # A deadlock or serialization failure: the transaction rolled back whole. The retry
            # middleware runs the request again; this 503 reaches the client only when every
            # attempt lost its race.
            log.warning("transaction aborted on %s %s: %s", request.method, request.url.path, exc.__class__.__name__)
            return error_response(
                503,
                "Unavailable",
                "the request conflicted with concurrent ones; retry shortly",
                headers={"Retry-After": "1", RETRY_HEADER.decode(): "1"},
            )
        if database_unavailable(exc):
            # PostgreSQL restarting or out of reach: the client may retry.
            log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
            return error_response(
                503, "Unavailable", "the database is unavailable; retry shortly", headers={"Retry-After": "1"}
            )
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "InternalError", "an unexpected error occurred; it has been logged")
