"""Companion scripts: work that rides on a lock's own two round trips.

A caller that does one thing on a conversation's data right after the lock
is granted, and another right before it is released (the server's message
path: load the conversation, then save it), would pay four round trips per
uncontended message: draw, load, save, release. A :class:`Companion` folds
its two steps into the lock's two scripts instead:

* its ``issue`` script is ISSUE plus the companion's first step, which runs
  in the same atomic script only when the ticket is granted at once;
* its ``release`` script is RELEASE preceded by the companion's last step.

Both are built with :func:`convlock.redis.scripts.issue_script` and
:func:`~convlock.redis.scripts.release_script`, so the lock logic exists
once. The lock's promises are unchanged (FIFO, leases, renewal, fencing,
hand-off, cancellation); a companion only adds what its own code does.

What a companion must do for itself:

* keep its keys in the conversation's hash slot (the ``{E}`` tag of
  :mod:`convlock.redis.keys`), so that a Cluster runs each script on one node;
* cope with the first step not having run: a ticket that waited is granted
  by a hand-off, a re-check or a push, none of which knows the companion, so
  :attr:`HeldLock.companion_reply` is then None and the caller does the
  first step itself (one more round trip, only for contended messages);
* make its last step safe to skip: when the release script cannot be run
  (Redis unreachable, the caller cancelled), the store releases with plain
  RELEASE in the background and the companion's step may or may not have
  run, which the caller learns as an exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .scripts import LuaScript

__all__ = ["Companion"]


@dataclass(frozen=True, slots=True)
class Companion:
    """The scripts and arguments a :class:`~convlock.redis.RedisLockStore` lock carries along.

    ``issue`` replaces ISSUE for this lock's first draw, with ``keys`` as
    ``KEYS[2..]`` and ``issue_args`` as ``ARGV[3..]``; for a grant at once
    the companion's reply lands in ``held.companion_reply``. ``release``
    replaces RELEASE when the holder calls ``release_with(args)``: ``keys``
    again as ``KEYS[2..]`` and ``args`` as ``ARGV[4..]``; ``release_with``
    returns the companion's reply. Build them with
    :func:`~convlock.redis.scripts.issue_script` and
    :func:`~convlock.redis.scripts.release_script`.
    """

    issue: LuaScript
    release: LuaScript
    keys: Sequence[str]
    issue_args: Sequence[Any] = ()
