"""Errors in the OpenAI shape ``{"error": {"type", "code", "message", "param"}}``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..protocol.errors import ProtocolError
from ..protocol.limits import MAX_JSON_DEPTH, loads_limited

log = logging.getLogger(__name__)


class APIError(Exception):
    """Raise from a route to answer with an OpenAI-shaped error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI error object every client SDK knows how to read."""
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status, headers=exc.headers
    )


async def _api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(
        error_body(str(exc.detail), kind, code=f"http_{exc.status_code}"),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    return JSONResponse(
        error_body(first.get("msg", "Invalid request"), "invalid_request_error", "invalid_value",
                   ".".join(loc) or None),
        status_code=400,
    )


async def _protocol_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProtocolError)
    return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), status_code=400)


async def _recursion_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Only client data nests deep enough to exhaust the stack (json, pydantic, our own walkers).
    log.warning("%s %s: nesting too deep for the stack (RecursionError)", request.method, request.url.path)
    return JSONResponse(error_body(f"The request nests deeper than the maximum of {MAX_JSON_DEPTH} levels.",
                                   "invalid_request_error", "nesting_too_deep"), status_code=400)


_INTERNAL_ERROR = error_body("The server had an error while processing your request.", "server_error",
                             "internal_error")


async def _server_error_handler(_: Request, exc: Exception) -> JSONResponse:
    # Reached only for errors raised outside CatchAllMiddleware; the server logs the traceback.
    return JSONResponse(_INTERNAL_ERROR, status_code=500)


class CatchAllMiddleware:
    """Answer an unexpected exception with a 500 in the OpenAI shape instead of plain text.

    Starlette's own fallback sits outside every user middleware (so its answer has no CORS
    headers, and a browser cannot even read it) and speaks plain text. Here the traceback is
    logged once and the client gets a JSON error; once a response has started there is nothing
    left to answer with, so the exception goes on to the server, which logs it and drops the
    connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started:
                raise
            log.exception("unhandled error answering %s %s", scope.get("method"), scope.get("path"))
            await JSONResponse(_INTERNAL_ERROR, status_code=500)(scope, receive, send)


class _RejectedBody(StarletteHTTPException):
    """Carries a ``ProtocolError`` through FastAPI's body parsing, which re-raises only HTTP errors."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(400, error.message)
        self.error = error


class _LimitedJSONRequest(Request):
    """A request whose ``json()`` refuses over-deep or invalid documents."""

    async def json(self) -> Any:
        if not hasattr(self, "_limited_json"):
            try:
                self._limited_json = loads_limited(await self.body())
            except ProtocolError as exc:
                raise _RejectedBody(exc) from None
        return self._limited_json


class LimitedJSONRoute(APIRoute):
    """Route class for routes with pydantic bodies: FastAPI parses their JSON with ``loads_limited``.

    FastAPI's own parsing uses plain ``json.loads``: a body nested thousands deep raises
    RecursionError (FastAPI then answers a vague 400), and one a few hundred deep reaches pydantic
    and the handlers. Here both become a clear 400 ``nesting_too_deep`` / ``invalid_json``; FastAPI
    still decides which bodies are JSON (by Content-Type).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            try:
                return await handler(_LimitedJSONRequest(request.scope, request.receive))
            except _RejectedBody as exc:
                raise exc.error from None

        return limited


def install_error_handlers(app: FastAPI) -> None:
    """Every error a client can see leaves in the OpenAI shape, whatever raised it."""
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(ProtocolError, _protocol_error_handler)
    app.add_exception_handler(RecursionError, _recursion_error_handler)
    app.add_exception_handler(Exception, _server_error_handler)
    app.add_middleware(CatchAllMiddleware)
