"""How a message takes its conversation's lock, loads it and saves it: the message path.

The channel (:mod:`.channel`) processes each message as::

    async with ctx.path.turn(conversation_id, wait_timeout=..., message_id=...) as turn:
        record = await turn.load()       # fenced by turn.ticket
        ...                              # the handler
        await turn.save(events, state, reply)
    # leaving the block releases the lock, if save() did not already

Two paths keep the same promises (FIFO per conversation, fenced saves: a
stale ticket's load or save raises :class:`~.tracker.StaleTicketError`,
which the channel answers 409; the lock released whatever happens):

* :class:`StoresPath`, for any lock store and tracker store: the lock's own
  calls plus the tracker's ``load`` and ``save``. On Redis that is four
  round trips for a message nobody else is waiting on.
* :class:`~.redis_message_path.RedisMessagePath`, when both stores are Redis
  stores on the same server: the lock's scripts carry the tracker's load and
  save along, two round trips in all.

:func:`choose_message_path` picks the second where it applies and says why
not otherwise.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Self

from ..store import HeldLock, LockStore
from .tracker import InMemoryTrackerStore, TrackerRecord, TrackerStore

__all__ = ["MessagePath", "MessageTurn", "StoresPath", "choose_message_path"]

logger = logging.getLogger("convlock.server")


class MessageTurn(abc.ABC):
    """One message's hold on its conversation: its ticket, its load and its save.

    An async context manager: entering waits for the lock (FIFO; bounded by
    ``wait_timeout``; cancellation withdraws the ticket), leaving releases it.
    Both are the lock's own (``self._lock``, a lock store's ``lock()``), so a
    turn keeps every promise of its lock store.
    """

    __slots__ = ("_held", "_lock")

    def __init__(self, lock: AbstractAsyncContextManager[HeldLock]) -> None:
        self._lock = lock
        self._held: HeldLock | None = None

    @property
    def ticket(self) -> int:
        """The lock's fencing token, which the load and the save carry."""
        assert self._held is not None, "the turn has not been entered"
        return self._held.ticket

    @property
    def granted_at_once(self) -> bool:
        """Whether the lock was granted without waiting, as far as its store knows (False: perhaps not)."""
        return self._held is not None and self._held.granted_at_once

    async def __aenter__(self) -> Self:
        self._held = await self._lock.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._lock.__aexit__(exc_type, exc, tb)

    @abc.abstractmethod
    async def load(self) -> TrackerRecord:
        """The conversation fenced by this ticket: state and recent window, or a replay."""

    @abc.abstractmethod
    async def save(
        self, new_events: Sequence[Mapping[str, Any]], state: Mapping[str, Any], reply: str | None
    ) -> None:
        """Append ``new_events`` and store ``state`` (and the message ID's ``reply``), fenced.

        May release the lock as part of the same call; leaving the block
        then releases nothing more.
        """


class MessagePath(abc.ABC):
    """Makes a :class:`MessageTurn` per message; see the module docstring."""

    @abc.abstractmethod
    def turn(
        self, conversation_id: str, *, wait_timeout: float | None, message_id: str | None
    ) -> MessageTurn:
        """A turn of ``conversation_id`` (enter it with ``async with``).

        ``wait_timeout`` None means the lock store's default. ``message_id``
        (None: none) makes the load answer a remembered ID with its replay
        and the save remember it.
        """

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the start-up log: which path, and why."""


class StoresPath(MessagePath):
    """The lock store's lock, the tracker store's load and save: works with any pair of stores."""

    def __init__(self, lock_store: LockStore, tracker_store: TrackerStore, *, why: str = "") -> None:
        self.lock_store = lock_store
        self.tracker_store = tracker_store
        self._why = why

    def turn(
        self, conversation_id: str, *, wait_timeout: float | None, message_id: str | None
    ) -> MessageTurn:
        return _StoresTurn(self, conversation_id, wait_timeout, message_id)

    def describe(self) -> str:
        detail = f" ({self._why})" if self._why else ""
        return f"message path: lock, then tracker load and save, as separate calls{detail}"


class _StoresTurn(MessageTurn):
    __slots__ = ("_message_id", "_path", "conversation_id")

    def __init__(
        self, path: StoresPath, conversation_id: str, wait_timeout: float | None, message_id: str | None
    ) -> None:
        super().__init__(path.lock_store.lock(conversation_id, wait_timeout=wait_timeout))
        self._path = path
        self.conversation_id = conversation_id
        self._message_id = message_id

    async def load(self) -> TrackerRecord:
        store = self._path.tracker_store
        if self._message_id is None:
            return await store.load(self.conversation_id, ticket=self.ticket)
        return await store.load(self.conversation_id, ticket=self.ticket, message_id=self._message_id)

    async def save(
        self, new_events: Sequence[Mapping[str, Any]], state: Mapping[str, Any], reply: str | None
    ) -> None:
        store = self._path.tracker_store
        # Custom stores written before message IDs take no such keywords.
        if self._message_id is None:
            await store.save(self.conversation_id, ticket=self.ticket, new_events=new_events, state=state)
        else:
            await store.save(
                self.conversation_id,
                ticket=self.ticket,
                new_events=new_events,
                state=state,
                message_id=self._message_id,
                reply=reply,
            )


def choose_message_path(lock_store: LockStore, tracker_store: TrackerStore) -> MessagePath:
    """The combined Redis path where both stores allow it, else :class:`StoresPath`."""
    if isinstance(tracker_store, InMemoryTrackerStore):
        return StoresPath(lock_store, tracker_store)
    from .redis_message_path import RedisMessagePath  # imports redis: only for other stores

    combined = RedisMessagePath.for_stores(lock_store, tracker_store)
    if isinstance(combined, RedisMessagePath):
        return combined
    return StoresPath(lock_store, tracker_store, why=combined)
