"""The handler protocol, loading ``module:callable``, and the built-in demo handler.

A handler is an async callable ``handler(message, conversation)`` returning
the responses to send back: ``None`` (no response), one ``str``, or an
iterable of ``str`` and ``dict`` items. A ``str`` becomes ``{"text": ...}``;
a ``dict`` is sent as is (it must be JSON) with ``recipient_id`` added. See
``docs/server.md`` for the guide and ``examples/handlers.py`` for examples.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from ..errors import ConfigError
from .conversation import Conversation, Message

__all__ = [
    "DEFAULT_HANDLER",
    "Handler",
    "HandlerResult",
    "demo_handler",
    "load_handler",
    "normalize_responses",
]

HandlerResult = str | Iterable[str | Mapping[str, Any]] | None
"""What a handler may return."""

Handler = Callable[[Message, Conversation], Awaitable[HandlerResult]]
"""The handler protocol: ``async def handler(message, conversation) -> HandlerResult``."""

DEFAULT_HANDLER = "convlock.server.handlers:demo_handler"


async def demo_handler(message: Message, conversation: Conversation) -> HandlerResult:
    """Answer with the message's text and its turn number: ``"#3: hello"``.

    The turn comes from the stored conversation, so a lost update or a
    reordering between replicas shows as a repeated or skipped number.
    """
    conversation.state["turns"] = conversation.turn
    return [f"#{conversation.turn}: {message.text}"]


def load_handler(spec: str) -> Handler:
    """Import ``module:callable`` (or ``module.callable``) and check it is an async callable.

    Raises :class:`~convlock.ConfigError` saying what is wrong and how to fix it.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            f"--handler: got {spec!r}; give it as 'module:callable', e.g. 'examples.handlers:counter'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--handler: cannot import module {module_name!r}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"--handler: module {module_name!r} has no attribute {attr!r}")
    call = getattr(target, "__call__", None)  # noqa: B004  (an instance with async __call__ counts too)
    if not (inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)):
        raise ConfigError(
            f"--handler: {spec!r} is not an async callable; define it as "
            "'async def handler(message, conversation)'"
        )
    handler: Handler = target
    return handler


def normalize_responses(result: object, recipient_id: str) -> list[dict[str, Any]]:
    """Turn a handler's return value into the channel's response dicts.

    Raises ``TypeError`` naming what was wrong with the value.
    """
    if result is None:
        return []
    items: Iterable[Any] = [result] if isinstance(result, str | Mapping) else result  # type: ignore[assignment]
    if not isinstance(items, Iterable):
        raise TypeError(
            f"handler returned {type(result).__name__}; return a str, a list of str/dict, or None"
        )
    responses = []
    for item in items:
        if isinstance(item, str):
            responses.append({"recipient_id": recipient_id, "text": item})
        elif isinstance(item, Mapping):
            responses.append({"recipient_id": recipient_id, **{str(k): v for k, v in item.items()}})
        else:
            raise TypeError(
                f"handler returned a {type(item).__name__} response; each response must be a str or a dict"
            )
    return responses
