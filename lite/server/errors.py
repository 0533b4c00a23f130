"""The one error type of the server's request handling: a 4xx the client can fix, with an OpenAI-style body."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request the client can fix: an HTTP status and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class BodyTooLarge(Exception):
    """The body grew past --max-body-mb while it was read (the guard answers 413)."""
