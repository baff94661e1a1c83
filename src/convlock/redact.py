"""Keeping secrets out of every output: masking helpers and a logging filter.

Design: the first line of defence is not to put a secret or a user's text
into a string at all (settings models leave passwords out of their reprs,
``describe()`` names a Redis by address only, handler failures are logged
without their exception messages). This module is the second line, for
text that comes from elsewhere (a library's error message, uvicorn's
access log line with ``?token=...``):

* :func:`register_secret` remembers a secret value (auth tokens, Redis
  passwords) for this process;
* :func:`redact` masks every registered value, the password part of any
  ``scheme://user:password@host`` URL, and ``token=``/``password=`` query
  parameters;
* :class:`RedactingFilter`, installed on every logging handler by
  :func:`install_log_redaction`, runs :func:`redact` over each record's
  message, arguments and traceback before any formatter sees it.

Trade-offs: values shorter than :data:`MIN_SECRET_LENGTH` are not
registered, since masking every "ab" in a log would make it unreadable (and
such a secret protects nothing). A handler added to a logger *after*
:func:`install_log_redaction` ran is not covered; the server installs it
once logging is configured (at app start-up, after uvicorn's own set-up).
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MASK",
    "MIN_SECRET_LENGTH",
    "RedactingFilter",
    "exception_summary",
    "install_log_redaction",
    "mask_url",
    "redact",
    "register_secret",
]

#: What a masked secret reads as.
MASK = "***"
#: Secrets shorter than this are not masked in free text (see the module docstring).
MIN_SECRET_LENGTH = 4

_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:]*:)(?P<password>[^\s/@]*)@")
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:token|access_token|auth_token|password|secret)=)(?P<value>[^&\s\"'#]*)", re.IGNORECASE
)

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()


def register_secret(value: str | None) -> None:
    """Remember ``value`` so that :func:`redact` masks it wherever it appears, for this process's life.

    ``None``, empty and very short values (under :data:`MIN_SECRET_LENGTH`) are ignored.
    """
    global _secrets
    if value is None or len(value) < MIN_SECRET_LENGTH:
        return
    with _lock:
        _secrets = _secrets | {value}


def mask_url(url: str) -> str:
    """``url`` with the password of any ``scheme://user:password@`` part replaced by :data:`MASK`."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}@", url)


def redact(text: str) -> str:
    """``text`` with registered secrets, URL passwords and secret query parameters masked."""
    for secret in sorted(_secrets, key=len, reverse=True):  # longest first: one may contain another
        if secret in text:
            text = text.replace(secret, MASK)
    text = mask_url(text)
    return _QUERY_SECRET.sub(lambda m: f"{m.group('head')}{MASK}", text)


def exception_summary(exc: BaseException) -> str:
    """The exception's type and traceback frames, without its message (or its causes' messages).

    An exception's message may quote the data it failed on, such as a user's
    text; its type and the lines it passed through are what an operator
    needs to find the fault.
    """
    frames = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
    name = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
    return redact(f"{name} (message withheld)\nTraceback (most recent call last):\n{frames}")


class _Redacted:
    """Stands in for a log argument that is not a string, rendering it redacted under %s and %r."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def __str__(self) -> str:
        return redact(str(self._value))

    def __repr__(self) -> str:
        return redact(repr(self._value))


def _redact_arg(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value  # numbers keep working with %d and %.3f
    return _Redacted(value)


class RedactingFilter(logging.Filter):
    """A handler filter that masks secrets in every record's message, arguments and traceback.

    Arguments are redacted one by one rather than merged into the message,
    because some formatters (uvicorn's access log) read ``record.args``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, Mapping):
            record.args = {key: _redact_arg(value) for key, value in record.args.items()}
        elif isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(value) for value in record.args)
        color = record.__dict__.get("color_message")
        if isinstance(color, str):
            record.__dict__["color_message"] = redact(color)
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_redaction() -> None:
    """Add a :class:`RedactingFilter` to every handler of every logger that exists now (idempotent)."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    known = logging.Logger.manager.loggerDict.values()
    loggers += [item for item in known if isinstance(item, logging.Logger)]
    for log in loggers:
        for handler in log.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
