"""A user-defined lock store, named by dotted path in config tests."""

from __future__ import annotations

from convlock import InMemoryLockStore


class TaggedLockStore(InMemoryLockStore):
    """An in-memory store that remembers an extra constructor keyword."""

    def __init__(self, *, tag: str, lifetime: float | None = None) -> None:
        super().__init__(lifetime=lifetime)
        self.tag = tag


class NotAStore:
    """Something that is not a LockStore."""
