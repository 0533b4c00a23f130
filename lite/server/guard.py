"""The server's outer layer: Host and Origin checks (lite.server.trust), CORS for the allowed origins,
API key, body-size limit, request and error counters, and the error handlers that turn every failure
into an OpenAI-style JSON error (a real bug: a logged 500, and the server goes on)."""

from __future__ import annotations

import hmac
import sys
import traceback
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from lite.server.errors import ApiError, BodyTooLarge, error_body

DRAIN_FACTOR = 4  # an oversized body is read and dropped up to 4x the limit, then the connection closes
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    headers = {"Retry-After": "5"} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def user_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(str(exc).splitlines()[0] if str(exc) else type(exc).__name__), status_code=400)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = {404: f"no route {request.method} {request.url.path}; the routes are listed in docs/server.md",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=exc.headers)


async def disconnected(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body("the client disconnected"), status_code=499)


class Guard:
    """Outermost ASGI middleware: API key, body-size limit, request/error counters, the 500 catch-all."""

    def __init__(self, app: Any, server_ref: list[Any]) -> None:
        self.app = app
        self.server_ref = server_ref

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = self.server_ref[0]
        limits = server.limits
        path = scope["path"]
        started = {"status": 0}

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        cors = origin is not None and server.trust.is_cross_origin(origin, headers.get("host"))

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
                if cors:  # only reached for an allowed origin: the others were refused below
                    message["headers"] = [*message.get("headers", []), (b"access-control-allow-origin",
                                          origin.encode("latin-1")), (b"vary", b"Origin")]
            await send(message)

        async def reply(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send_wrapper)

        try:
            if not server.trust.host_allowed(headers.get("host")):
                cors = False
                await reply(403, error_body(f"Host {headers.get('host')!r} is not this server's name (a DNS-rebinding "
                                            "guard); use http://127.0.0.1:PORT/, or start the server with "
                                            "--allowed-host NAME", code="host_not_allowed"))
                return
            if origin is not None and not server.trust.origin_allowed(origin, headers.get("host")):
                cors = False
                await reply(403, error_body(f"requests from the web origin {origin!r} are refused (a cross-site "
                                            "guard); start the server with --cors-origin ORIGIN to allow it",
                                            code="origin_not_allowed"))
                return
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                preflight = {"Access-Control-Allow-Methods": CORS_METHODS, "Access-Control-Allow-Headers": CORS_HEADERS,
                             "Access-Control-Max-Age": "600"}
                await Response(status_code=204, headers=preflight)(scope, receive, send_wrapper)
                return
            key = server.settings.api_key
            if key is not None and (path.startswith("/v1/") or path == "/metrics"):
                given = headers.get("authorization", "")
                token = given[7:].strip() if given.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), key.encode()):
                    await reply(401, error_body("missing or wrong API key: send 'Authorization: Bearer KEY' "
                                                "(the key given to --api-key)", "invalid_request_error",
                                                code="invalid_api_key"), {"WWW-Authenticate": "Bearer"})
                    return
            length = headers.get("content-length")
            too_big = error_body(f"the request body is larger than {limits.max_body_bytes} bytes "
                                 f"(the server's --max-body-mb); send a smaller image", code="body_too_large")
            seen = {"bytes": 0, "done": False}

            async def drain() -> None:
                """Read and drop the rest of an oversized body (up to a cap), so the client sees the 413
                instead of a connection reset."""
                while not seen["done"] and seen["bytes"] <= DRAIN_FACTOR * limits.max_body_bytes:
                    message = await receive()
                    seen["bytes"] += len(message.get("body", b""))
                    seen["done"] = message["type"] != "http.request" or not message.get("more_body", False)

            if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
                await drain()
                await reply(413, too_big, {"Connection": "close"})
                return

            async def limited_receive() -> dict:
                message = await receive()
                if message["type"] == "http.request":
                    seen["bytes"] += len(message.get("body", b""))
                    seen["done"] = not message.get("more_body", False)
                    if seen["bytes"] > limits.max_body_bytes:
                        raise BodyTooLarge()
                return message

            try:
                await self.app(scope, limited_receive, send_wrapper)
            except BodyTooLarge:
                if not started["status"]:
                    await drain()
                    await reply(413, too_big, {"Connection": "close"})
            except ClientDisconnect:
                pass
            except Exception as exc:  # noqa: BLE001 - the catch-all: log, answer 500, keep serving
                traceback.print_exception(exc, file=sys.stderr)
                if not started["status"]:
                    await reply(500, error_body("internal server error (the traceback is in the server's log)",
                                                "server_error"))
        finally:
            server.metrics.request(path, started["status"] or 499)
