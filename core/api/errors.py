"""Errors as JSON an admin or an agent can act on: ``{"error": "...", "code": "..."}``.

Never a traceback, never a 500 for bad input; unauthenticated callers learn nothing.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.api.fields import INT64_MAX, INT64_MIN
from core.model import IllegalTransition
from core.service import AlreadyRegistered, Forbidden, Invalid, NotYetKnown, Unauthorized
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


def _out_of_range(request: Request) -> list[str]:
    """Path and query integers SQLite cannot hold: routes declare them plain ``int``."""
    found = []
    for where, params in (("path", request.path_params), ("query", request.query_params)):
        for name, value in params.items():
            try:
                number = int(value)
            except (TypeError, ValueError):
                continue
            if not INT64_MIN <= number <= INT64_MAX:
                found.append(f"{where}.{name}: must be between {INT64_MIN} and {INT64_MAX}")
    return found


def _unreadable_body(exc: StarletteHTTPException) -> str | None:
    """What FastAPI's 400 "error parsing the body" was (it names no cause): JSON nested
    deeper than the parser's stack, bytes that are not UTF-8, a number Python will not read."""
    if exc.status_code != 400:
        return None
    if isinstance(exc.__cause__, RecursionError):
        return "body: JSON nested too deeply"
    if isinstance(exc.__cause__, UnicodeDecodeError):
        return "body: not valid UTF-8"
    if isinstance(exc.__cause__, ValueError):  # e.g. an integer of over 4,300 digits
        return f"body: not readable JSON ({str(exc.__cause__).split(':')[0]})"
    return None


def invalid(problems: list[str]) -> JSONResponse:
    return JSONResponse(
        {**error_body("; ".join(problems), "invalid_request"), "problems": problems}, 422
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(exc.message, exc.code), exc.status, headers=headers)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
        return JSONResponse(
            error_body("unauthorized", "unauthorized"), 401, headers={"WWW-Authenticate": "Bearer"}
        )

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> JSONResponse:
        return JSONResponse(error_body("forbidden", "forbidden"), 403)

    @app.exception_handler(NotYetKnown)
    async def _not_yet(request: Request, exc: NotYetKnown) -> JSONResponse:
        return JSONResponse(
            error_body("the launch result is not recorded yet; retry shortly", "not_yet_known"),
            409,
        )

    @app.exception_handler(Invalid)
    async def _invalid_values(request: Request, exc: Invalid) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_request"), 422)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "not_found"), 404)

    @app.exception_handler(AlreadyRegistered)
    async def _registered(request: Request, exc: AlreadyRegistered) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "already_registered"), 409)

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "conflict"), 409)

    @app.exception_handler(IllegalTransition)
    async def _illegal(request: Request, exc: IllegalTransition) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "conflict"), 409)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid([f"{_location(e['loc'])}: {e['msg']}" for e in exc.errors()])

    # What a request model let through but SQLite refuses is the caller's input, not our
    # failure: a 422 and one log line, never a traceback.
    @app.exception_handler(OverflowError)
    async def _overflow(request: Request, exc: OverflowError) -> JSONResponse:
        log.warning("event=api_input_overflow path=%s error=%s", request.url.path, exc)
        return invalid(_out_of_range(request) or [f"a number is out of range: {exc}"])

    @app.exception_handler(UnicodeEncodeError)
    async def _unencodable(request: Request, exc: UnicodeEncodeError) -> JSONResponse:
        log.warning("event=api_input_unencodable path=%s", request.url.path)
        return invalid(["text must be valid Unicode (a lone surrogate is not)"])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        unreadable = _unreadable_body(exc)
        if unreadable:
            return invalid([unreadable])
        if exc.status_code == 404 and exc.detail == "Not Found":  # Starlette's: no such route
            where = f"{request.method} {request.url.path}"[:200]
            return JSONResponse(error_body(f"no such route: {where}", "no_route"), 404)
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status_code, "http_error"
        )
        # The rest of a body refused midway is still on its way: the connection cannot be
        # reused, and the client is told so.
        headers = {"Connection": "close"} if exc.status_code == 413 else None
        return JSONResponse(error_body(str(exc.detail), code), exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("event=api_error path=%s", request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal error", "internal"), 500)
