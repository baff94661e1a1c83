"""RedisMessagePath: a message in two round trips when the lock and the tracker share a Redis.

What it promises
----------------
For a message whose ticket is granted at once (nobody holds or waits), the
whole lock-load-handler-save-release cycle costs two ``EVALSHA`` calls:

1. **In** (:data:`IN`): draw a ticket; when it is granted at once, raise
   the tracker's fence to it, look up the message ID, and return the state,
   the stored turn and count and the recent window (or the remembered
   reply of a repeated message ID);
2. **Out** (:data:`OUT`): check the fence, append the events, save the
   state, remember the message ID with its reply, then release the ticket
   and hand the lock to the next one, all in one script.

A ticket that has to wait is granted by the lock's own machinery (an
in-process hand-off, a wake-up, a re-check), none of which carries the
tracker's load, so it loads with the tracker store's own fenced ``LOAD``:
three round trips for a contended message, against four on the separate
path.

Every promise of the separate path (:class:`~.message_path.StoresPath`)
holds, because the scripts are the same code: In and Out are
:data:`convlock.redis.scripts.ISSUE` and ``RELEASE`` built around the
tracker's named pieces (:mod:`.redis_tracker_scripts`), not copies of them.

* FIFO, leases, renewal, in-process hand-off, wake-ups, cancellation: the
  lock store's, unchanged (the pieces only add work to its scripts).
* Fencing: the load raises the fence to the ticket and the save checks it,
  exactly as ``LOAD`` and ``SAVE`` do, so a stale holder's save is refused
  (the channel answers 409) and its successor's state stands; the release
  in the same script then lets go of a ticket that holds nothing, a no-op.
* Failures: if Out cannot be run or its reply is lost, the ticket is
  released with plain RELEASE in the background and the caller gets
  :class:`~convlock.LockStoreUnavailable` (503): the save may or may not
  have happened, as with a lost reply on the separate path. A retry with
  the same message ID is answered once, from the remembered reply if the
  save did happen.
* Cluster: the tracker's keys carry the conversation's hash tag, as the
  lock's do, so each script touches one slot.

When it applies
---------------
:meth:`RedisMessagePath.for_stores` takes it only when the lock store is a
:class:`~convlock.redis.RedisLockStore` and the tracker store a
:class:`~.redis_tracker.RedisTrackerStore`, both built from settings that
name the same server, database and user (:func:`~convlock.redis.connection.same_server`),
and the tracker does not wait for replicas (``min_replicas_acked: 0``):
a save confirmed by ``WAIT`` must be followed by the ``WAIT`` on the same
connection before the lock is let go, which the separate path does. The
scripts run on the lock store's connections (its budget, its timeouts, never
re-sent); the tracker store's client serves the contended load and paging.

Open questions: a contended message could get its load pushed with its
wake-up, which would make it two round trips as well; the wake-up carries
one short string today, and a window of events per push would cost memory
in Redis for every waiter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..redis import scripts
from ..redis.companion import Companion
from ..redis.connection import same_server
from ..redis.store import RedisLockStore
from ..store import LockStore
from . import redis_tracker_scripts as lua
from .message_path import MessagePath, MessageTurn
from .redis_tracker import RedisTrackerStore
from .tracker import TrackerRecord, TrackerStore

__all__ = ["IN", "OUT", "RedisMessagePath"]

# In: ISSUE whose companion_in(t) runs the tracker's LOAD pieces for ticket
# t. KEYS[2..5]: the tracker's record, events, ids and order keys; ARGV[3..5]: TTL
# (ms), message ID ('' for none), window. Reply when granted at once:
# {t, 'granted', LOAD's reply}; else ISSUE's {t, holder's lease left}.
_LOAD_IN = (
    """
local function companion_in(t)
"""
    + lua.load_locals(2, 3, "fmt(t)")
    + """
  local function load()
"""
    + lua.FENCE_RAISE
    + lua.MESSAGE_ID_LOOKUP
    + lua.READ_RECORD
    + """
  end
  return load()
end
"""
)

# Out: the tracker's SAVE pieces, then RELEASE. KEYS[2..5] as In; ARGV[1..3]
# RELEASE's (ticket, '0', tag); ARGV[4..]: SAVE's after its ticket (TTL,
# state, message ID, reply, remember, users, retain, events...). Reply:
# {RELEASE's reply, SAVE's reply}.
_SAVE_OUT = (
    """
local function companion_out()
"""
    + lua.save_locals(2, 4)
    + lua.FENCE_CHECK
    + lua.APPEND_AND_SAVE
    + lua.MESSAGE_ID_REMEMBER
    + lua.TOUCH_TTL
    + """
end
"""
)

#: Draw a ticket and, if it is granted at once, load the conversation fenced by it.
IN = scripts.issue_script("message_in", _LOAD_IN)
#: Save the conversation fenced by the ticket, then release it and hand off.
OUT = scripts.release_script("message_out", _SAVE_OUT)


class RedisMessagePath(MessagePath):
    """Lock, load, save and release in two scripts; see the module docstring for its promises."""

    def __init__(self, lock_store: RedisLockStore, tracker_store: RedisTrackerStore) -> None:
        self.lock_store = lock_store
        self.tracker_store = tracker_store

    @classmethod
    def for_stores(cls, lock_store: LockStore, tracker_store: TrackerStore) -> RedisMessagePath | str:
        """The combined path for these stores, or why it does not apply to them."""
        if not isinstance(lock_store, RedisLockStore) or not isinstance(tracker_store, RedisTrackerStore):
            return "the lock store and the tracker store are not both Redis stores"
        if lock_store.settings is None or tracker_store.settings is None:
            return "a store was built from a client passed in, so its server is unknown"
        if not same_server(lock_store.settings, tracker_store.settings):
            return "the lock store and the tracker store are on different Redis servers or databases"
        if tracker_store.min_replicas_acked:
            return (
                f"min_replicas_acked is {tracker_store.min_replicas_acked}: each save waits for replicas "
                "before the lock is released"
            )
        return cls(lock_store, tracker_store)

    def turn(
        self, conversation_id: str, *, wait_timeout: float | None, message_id: str | None
    ) -> MessageTurn:
        return _RedisTurn(self, conversation_id, wait_timeout, message_id)

    def describe(self) -> str:
        return (
            "message path: combined (lock and tracker on one Redis: two round trips per uncontended message)"
        )


class _RedisTurn(MessageTurn):
    __slots__ = ("_hold", "_message_id", "_tracker", "conversation_id")

    def __init__(
        self, path: RedisMessagePath, conversation_id: str, wait_timeout: float | None, message_id: str | None
    ) -> None:
        tracker = self._tracker = path.tracker_store
        companion = Companion(IN, OUT, tracker.keys(conversation_id), tracker.load_args(message_id))
        self._hold = path.lock_store.lock(conversation_id, wait_timeout=wait_timeout, companion=companion)
        super().__init__(self._hold)
        self.conversation_id = conversation_id
        self._message_id = message_id

    async def load(self) -> TrackerRecord:
        hold, tracker = self._hold, self._tracker
        # In's reply carries the load only when the ticket was granted at once.
        reply = hold.companion_reply
        if reply is None:  # the ticket waited: load on its own
            return await tracker.load(self.conversation_id, ticket=hold.ticket, message_id=self._message_id)
        hold.companion_reply = None
        cid, message_id = self.conversation_id, self._message_id
        return await tracker.loaded(cid, reply, ticket=hold.ticket, message_id=message_id)

    async def save(
        self, new_events: Sequence[Mapping[str, Any]], state: Mapping[str, Any], reply: str | None
    ) -> None:
        tracker = self._tracker
        result = await self._hold.release_with(tracker.save_args(new_events, state, self._message_id, reply))
        tracker.saved(self.conversation_id, result, ticket=self._hold.ticket)
