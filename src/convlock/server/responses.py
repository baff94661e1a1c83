"""JSON error responses: every refusal says what went wrong in a ``reason``.

Endpoints raise :class:`ApiError`; the app's exception handlers turn it (and
Starlette's own 404/405) into ``{"error": <code>, "reason": <text>}``.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import Response

from ..redact import exception_summary
from .jsontext import dumps_ascii

__all__ = ["ApiError", "JSONResponse", "error_response", "render_json", "unexpected_error_response"]

logger = logging.getLogger("convlock.server")


def render_json(content: Any) -> bytes:
    """The bytes every JSON response of this server sends for ``content`` (ASCII, compact)."""
    return dumps_ascii(content)


class JSONResponse(Response):
    """A JSON response that can encode any ``str`` (lone surrogates are escaped).

    Starlette's own JSONResponse writes raw UTF-8 and would fail with a 500
    on a lone surrogate echoed from a request, so this one escapes non-ASCII.
    """

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return render_json(content)


class ApiError(Exception):
    """An HTTP error with a machine-readable ``error`` code and a human ``reason``."""

    def __init__(
        self, status_code: int, error: str, reason: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.error = error
        self.reason = reason
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
        return error_response(self.status_code, self.error, self.reason, headers=self.headers)


def error_response(
    status_code: int, error: str, reason: str, *, headers: dict[str, str] | None = None
) -> JSONResponse:
    """``{"error": error, "reason": reason}`` with ``status_code``."""
    return JSONResponse({"error": error, "reason": reason}, status_code=status_code, headers=headers)


def unexpected_error_response(method: str, path: str, exc: Exception) -> JSONResponse:
    """Log an exception no endpoint turned into an :class:`ApiError`; the 500 that answers it."""
    # The message may quote request data; it goes to the debug log only.
    logger.error("unexpected error on %s %s: %s", method, path, exception_summary(exc))
    logger.debug("unexpected error on %s %s", method, path, exc_info=exc)
    return error_response(500, "internal_error", f"unexpected {type(exc).__name__}; see the server log")
