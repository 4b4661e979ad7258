"""Errors as JSON an admin or an agent can act on: ``{"error": "...", "code": "..."}``.

Never a traceback, never a 500 for bad input; unauthenticated callers learn nothing.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.model import IllegalTransition
from core.store import Conflict, NotFound

log = logging.getLogger("alienec2.api")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "unauthorized")


def forbidden() -> ApiError:
    return ApiError(403, "forbidden", "forbidden")


def error_body(message: str, code: str) -> dict[str, str]:
    return {"error": message, "code": code}


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(exc.message, exc.code), exc.status, headers=headers)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "not_found"), 404)

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "conflict"), 409)

    @app.exception_handler(IllegalTransition)
    async def _illegal(request: Request, exc: IllegalTransition) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "conflict"), 409)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{_location(e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(
            {**error_body("; ".join(problems), "invalid_request"), "problems": problems}, 422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(error_body(str(exc.detail), code), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("event=api_error path=%s", request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal error", "internal"), 500)
