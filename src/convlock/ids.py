"""Validation of conversation IDs, shared by every store.

A conversation ID is any non-empty ``str`` of at most 4096 bytes once encoded
as UTF-8. The bound keeps Redis keys and log lines reasonable; it is checked
in bytes, not characters, because that is what reaches the backend.
"""

from __future__ import annotations

MAX_CONVERSATION_ID_BYTES = 4096



def check_conversation_id(conversation_id: object) -> str:
    """Return ``conversation_id`` unchanged if it is valid, else raise ValueError.

    The error message says what is allowed, so it can be shown to an API
    client as is.
    """
    # An ASCII str has one byte per character, so the common case needs no
    # encode(); everything else pays for one to count bytes and reject lone
    # surrogates, which no backend could store.
    if (
        type(conversation_id) is str
        and 0 < len(conversation_id) <= MAX_CONVERSATION_ID_BYTES
        and conversation_id.isascii()
    ):
        return conversation_id
    if not isinstance(conversation_id, str):
        raise ValueError(
            "conversation_id must be a non-empty str of at most "
            f"{MAX_CONVERSATION_ID_BYTES} UTF-8 bytes, got {type(conversation_id).__name__}"
        )
    if not conversation_id:
        raise ValueError(
            "conversation_id must be a non-empty str of at most "
            f"{MAX_CONVERSATION_ID_BYTES} UTF-8 bytes, got an empty string"
        )
    try:
        size = len(conversation_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(
            "conversation_id must be valid Unicode text (it contains a lone surrogate)"
        ) from None
    if size > MAX_CONVERSATION_ID_BYTES:
        raise ValueError(
            f"conversation_id must be at most {MAX_CONVERSATION_ID_BYTES} UTF-8 bytes, "
            f"got {size} bytes"
        )
    return conversation_id
