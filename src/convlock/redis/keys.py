"""Redis key names for a conversation: collision-free, one Cluster slot, namespaced.

Layout, for ``key_prefix`` ``P`` and a conversation whose encoded ID is ``E``::

    P:{E}:s          hash: last ticket issued (n); the holder's ticket, lease
                     end, length and draw ID (h, e, l, o); the number of
                     waiters (w); the furthest lease end (x); each waiter's
                     lease end, length and draw ID (e<T>, l<T>, o<T>)
    P:{E}:q          sorted set: the waiting tickets, score = ticket number
                     (absent while nobody waits)
    P:{E}:w:<T>      list: wake-up for ticket T, pushed when T is granted

Encoding: ``E`` is the conversation ID's UTF-8 bytes with every byte outside
``A-Z a-z 0-9 - . _ ~ @ + = , /`` written as ``%XX`` (upper-case hex). This
is injective (``%`` itself is escaped), so two IDs never share a key, and it
is reversible, so :meth:`KeySpace.conversation_of` reads the ID back from a
state key found by SCAN. The encoded form never contains ``{``, ``}``, ``:``,
glob characters or white space, which buys three things:

* the braces delimit a Redis Cluster hash tag, so every key of one
  conversation hashes to one slot and a Lua script may touch them all;
* ``:`` after the closing brace cannot be confused with a ``:`` inside an ID;
* the SCAN pattern ``P:{*}:s`` cannot be widened by an ID.

``key_prefix`` may itself contain ``:`` (``app:convlock``) or glob
characters; it may not contain braces (the settings model refuses them),
because a brace in the prefix would move the hash tag.

IDs with lone surrogates cannot get here (``ids.check_conversation_id``
rejects them) but are still encoded deterministically, via ``surrogatepass``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ConversationKeys", "KeySpace", "decode_id", "encode_id"]

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~@+=,/")
_ESCAPES = tuple(chr(b) if b in _SAFE else f"%{b:02X}" for b in range(256))
_HEX = frozenset("0123456789ABCDEF")
_GLOB_SPECIAL = frozenset("*?[]\\^-")
# The same set as _SAFE, for one C-speed scan of the common, all-safe ID.
_NEEDS_ESCAPE = re.compile(r"[^A-Za-z0-9\-._~@+=,/]")


def encode_id(conversation_id: str) -> str:
    """The key-safe, reversible encoding of ``conversation_id`` (see the module docstring).

    Distinct IDs always give distinct encodings; the result uses only
    unreserved ASCII characters and ``%``.
    """
    if _NEEDS_ESCAPE.search(conversation_id) is None:
        return conversation_id  # the common case: nothing to escape
    raw = conversation_id.encode("utf-8", "surrogatepass")
    return "".join([_ESCAPES[b] for b in raw])


def decode_id(encoded: str) -> str:
    """Invert :func:`encode_id`; raise ``ValueError`` for text it cannot have produced."""
    out = bytearray()
    i = 0
    n = len(encoded)
    while i < n:
        ch = encoded[i]
        if ch == "%":
            pair = encoded[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise ValueError(f"bad escape at offset {i} in encoded conversation ID {encoded!r}")
            value = int(pair, 16)
            if value in _SAFE:
                raise ValueError(f"needless escape %{pair} in encoded conversation ID {encoded!r}")
            out.append(value)
            i += 3
            continue
        if not ch.isascii() or ord(ch) not in _SAFE:
            raise ValueError(f"unescaped character {ch!r} in encoded conversation ID {encoded!r}")
        out.append(ord(ch))
        i += 1
    return out.decode("utf-8", "surrogatepass")


def _escape_glob(text: str) -> str:
    return "".join("\\" + ch if ch in _GLOB_SPECIAL else ch for ch in text)


@dataclass(frozen=True, slots=True)
class ConversationKeys:
    """The keys of one conversation; all share one Cluster hash slot."""

    queue: str
    state: str
    wake_prefix: str

    def wake(self, ticket: int) -> str:
        """The wake-up list of ``ticket``."""
        return f"{self.wake_prefix}{ticket}"

    @property
    def tag(self) -> str:
        """The Cluster hash tag (the text between the braces) that every key here shares."""
        start = self.state.index("{") + 1
        return self.state[start : self.state.index("}", start)]


class KeySpace:
    """Maps conversation IDs to keys under one ``key_prefix``, and back.

    Two key spaces with different prefixes never share a key, provided
    neither prefix followed by ``:{`` is a prefix of the other's keys, which
    holds because prefixes contain no braces.
    """

    __slots__ = ("_state_suffix", "_tag_start", "prefix")

    def __init__(self, prefix: str) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"key_prefix must be non-empty and free of braces, got {prefix!r}")
        self.prefix = prefix
        self._tag_start = f"{prefix}:{{"
        self._state_suffix = "}:s"

    def keys(self, conversation_id: str) -> ConversationKeys:
        """The keys of ``conversation_id`` (which must be non-empty)."""
        if not conversation_id:
            raise ValueError("conversation_id must be non-empty")
        base = self._tag_start + encode_id(conversation_id)
        return ConversationKeys(queue=base + "}:q", state=base + "}:s", wake_prefix=base + "}:w:")

    def state_pattern(self) -> str:
        """The SCAN ``MATCH`` pattern that finds every conversation's state key.

        Every busy conversation has one (an idle conversation may too, for
        a few microseconds, holding only its ticket counter).
        """
        return _escape_glob(self._tag_start) + "*" + _escape_glob(self._state_suffix)

    def conversation_of(self, state_key: str | bytes) -> str | None:
        """The conversation ID whose state key this is, or None for any other key."""
        key = state_key.decode("utf-8", "surrogateescape") if isinstance(state_key, bytes) else state_key
        if not (key.startswith(self._tag_start) and key.endswith(self._state_suffix)):
            return None
        encoded = key[len(self._tag_start) : -len(self._state_suffix)]
        if not encoded:
            return None
        try:
            return decode_id(encoded)
        except (ValueError, UnicodeDecodeError):
            return None  # someone else's key that happens to match the pattern
