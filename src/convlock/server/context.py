"""The objects every endpoint shares, built once per app."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

from ..store import LockStore
from .access import AccessSettings
from .deadlines import SharedDeadlines
from .handlers import Handler
from .message_path import MessagePath, choose_message_path
from .metrics import ServerMetrics
from .tracker import TrackerStore, supports_message_ids

__all__ = ["ServerContext"]


@dataclass(slots=True)
class ServerContext:
    """Stores, handler and options of one running app (``request.app.state.ctx``).

    ``handler_timeout`` bounds each handler call in seconds (None: no bound).
    ``auth_token`` is the ``--auth-token`` (None: none set); ``access`` holds it
    with the other access options that :mod:`.access` enforces.
    ``in_flight`` counts messages being processed; ``idle`` is set whenever it
    is 0, so shutdown can wait until every message has released its lock.
    ``waiting`` counts, per conversation, messages of this process waiting for
    its lock; past ``max_waiting`` a message is refused with 429.
    ``process_abandoned`` processes a message even when its client has
    disconnected before the lock was granted (for fire-and-forget clients);
    by default such a message is released unprocessed.
    ``message_ids`` says whether the tracker store remembers message IDs.
    ``path`` is how a message locks, loads and saves its conversation
    (:func:`~.message_path.choose_message_path` picks it from the stores).
    ``handler_deadlines`` bounds handler calls to ``handler_timeout`` with one
    shared timer (None without a bound; see :mod:`.deadlines`).
    """

    lock_store: LockStore
    tracker_store: TrackerStore
    handler: Handler
    handler_timeout: float | None = 30.0
    auth_token: str | None = field(default=None, repr=False)
    access: AccessSettings = field(default_factory=AccessSettings)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    process_abandoned: bool = False
    in_flight: int = 0
    max_waiting: int = 100
    waiting: dict[str, int] = field(default_factory=dict)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    message_ids: bool = field(init=False, default=True)
    path: MessagePath = field(init=False)
    handler_deadlines: SharedDeadlines | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.idle.set()
        if self.auth_token is not None and self.access.auth_token is None:
            self.access = dataclasses.replace(self.access, auth_token=self.auth_token)
        self.message_ids = supports_message_ids(self.tracker_store)
        self.path = choose_message_path(self.lock_store, self.tracker_store)
        if self.handler_timeout is not None:
            self.handler_deadlines = SharedDeadlines(self.handler_timeout)
        # The gauge reads the count at scrape time: nothing to update per message
        # (an inc() and a dec(), each taking prometheus_client's lock, were two
        # of the dozen metric updates a message made).
        self.metrics.in_flight.set_function(lambda: self.in_flight)
