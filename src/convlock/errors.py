"""The exceptions convlock raises, arranged so that callers can catch by meaning.

Every failure to obtain or keep a conversation lock is a :class:`LockError`; its
subclasses say *why*, in the manner of httpx's exception tree::

    LockError
    ├── LockTimeoutError      waiting exceeded ``wait_timeout`` (also a TimeoutError)
    ├── LockLostError         the lease lapsed or was force-released while held
    └── LockStoreUnavailable  the backend could not be reached (also a ConnectionError)

    ConfigError               a bad ``endpoints.yml`` value (also a ValueError)

Invalid arguments, such as an empty conversation ID, raise plain ``ValueError``:
they are programming errors, not lock failures, and retrying cannot help.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "LockError",
    "LockLostError",
    "LockStoreUnavailable",
    "LockTimeoutError",
]


class LockError(Exception):
    """Base class of every failure to obtain or keep a conversation lock.

    ``conversation_id`` names the conversation concerned, where there is one.
    """

    def __init__(self, message: str, *, conversation_id: str | None = None) -> None:
        super().__init__(message)
        self.conversation_id = conversation_id


class LockTimeoutError(LockError, TimeoutError):
    """The lock was not granted within ``wait_timeout`` seconds.

    The caller's ticket has been withdrawn from the queue before this is raised,
    so the tickets behind it are not delayed by the abandoned wait.
    """


class LockLostError(LockError):
    """The caller held the lock but no longer does.

    Raised by ``await held.ensure()`` when the lease lapsed (the holder ran past
    ``lifetime`` without renewal, or renewal could not reach the store) or when
    an operator force-released the conversation. Work done since the loss may
    overlap with the next holder's; the fencing token (``held.ticket``) lets a
    downstream store refuse such stale writes.
    """

    @classmethod
    def for_ticket(cls, conversation_id: str, ticket: int, lifetime: float) -> LockLostError:
        """The error every store raises from ``held.ensure()``, worded alike."""
        return cls(
            f"lock on conversation {conversation_id!r} was lost: ticket {ticket} was "
            f"revoked or its {lifetime:g}s lease lapsed",
            conversation_id=conversation_id,
        )


class LockStoreUnavailable(LockError, ConnectionError):
    """The lock store's backend could not be reached or answered with an error.

    The message names the backend address. Nothing was granted: if an acquire
    fails this way, the caller does not hold the lock.
    """


class ConfigError(ValueError):
    """A lock or tracker store configuration is invalid.

    The message names the offending key, the value found and what is allowed,
    so that the fix is obvious from the message alone.
    """
