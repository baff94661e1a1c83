"""Log set-up for ``convlock run`` and the CLI: text or one JSON object per line, secrets masked.

Design: convlock's modules log with the standard :mod:`logging` package
only; this module is the one place that decides how records look. The
JSON format writes ``time``, ``level``, ``logger`` and ``message``, plus
the ``conversation_id``, ``ticket`` and ``event`` attributes that lock
events carry (:class:`convlock.observe.LockEventLog`), and ``exception``
when there is a traceback.

Secrets: every formatted line, in either format, passes through
:func:`redact`, which replaces each configured secret (Redis passwords,
the server's auth token) with ``***`` and masks the password part of any
``scheme://user:password@host`` URL. That is a last line of defence: the
code already avoids putting secrets into messages (see
``convlock.redis.connection.describe``), but a third-party library's
message (an access log with ``?token=``, a driver's error quoting a URL)
is masked too. Secrets shorter than :data:`MIN_SECRET_LENGTH` are not
searched for, since masking every ``a`` in a log would hide everything.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any, Literal

from .redact import MASK, MIN_SECRET_LENGTH
from .redact import redact as _redact

__all__ = ["MIN_SECRET_LENGTH", "JsonFormatter", "RedactingFormatter", "configure_logging", "redact"]

LogFormat = Literal["text", "json"]

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Record attributes written as JSON fields when present.
_EXTRA_FIELDS = ("conversation_id", "ticket", "event")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with ``secrets`` masked, then everything :func:`convlock.redact.redact` masks."""
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, MASK)
    return _redact(text)


class RedactingFormatter(logging.Formatter):
    """A text formatter whose output passes through :func:`redact`."""

    def __init__(self, fmt: str = _TEXT_FORMAT, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self.secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage(), self.secrets),
        }
        for name in _EXTRA_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = redact(value, self.secrets) if isinstance(value, str) else value
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info), self.secrets)
        return json.dumps(out, ensure_ascii=False, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each record to whatever ``sys.stderr`` is when the record is emitted.

    So a process (or a test) that swaps ``sys.stderr`` later is never left
    with a handler on a closed stream.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: str = "info", fmt: LogFormat = "text", secrets: Iterable[str] = ()) -> None:
    """Send every logger's records to stderr in ``fmt``, at ``level`` and above, secrets masked.

    Replaces the handler an earlier call installed (others, such as a test
    runner's, are left alone), so calling it again reconfigures.
    """
    handler = _StderrHandler()
    secrets = tuple(secrets)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else RedactingFormatter(secrets=secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _StderrHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
