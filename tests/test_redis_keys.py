"""Key naming without Redis: injective, reversible, one hash slot, namespaced."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from convlock.redis.keys import KeySpace, decode_id, encode_id

HOSTILE = [
    "a:b",
    "a:b:q",
    "}:q",
    "{a}",
    "{",
    "}",
    "*",
    "user*",
    "a?b[c]\\",
    "x%41",
    "A",
    "ünïcødé",
    "日本語",
    "emoji 🙂",
    " lead and trail ",
    "tab\tnew\nline",
    "\x00nul",
    "a}:s",
    "a}:w:1",
]


def _redis_glob(pattern: str, text: str) -> bool:
    # Enough of Redis' stringmatch for our patterns: backslash escapes and '*'.
    parts = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            parts.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        parts.append(".*" if ch == "*" else re.escape(ch))
        i += 1
    return re.fullmatch("".join(parts), text, re.DOTALL) is not None


def test_hostile_ids_get_distinct_keys_that_round_trip() -> None:
    space = KeySpace("convlock")
    seen: dict[str, str] = {}
    for cid in HOSTILE:
        keys = space.keys(cid)
        for key in (keys.queue, keys.state, keys.wake(7)):
            assert key not in seen, f"{cid!r} collides with {seen.get(key)!r} on {key!r}"
            seen[key] = cid
        assert space.conversation_of(keys.state) == cid
        assert space.conversation_of(keys.state.encode()) == cid


def test_encoded_ids_have_no_structural_characters() -> None:
    for cid in HOSTILE:
        encoded = encode_id(cid)
        assert encoded.isascii()
        assert not set(encoded) & set("{}:*?[]\\ \t\n")


def test_all_keys_of_a_conversation_share_one_slot() -> None:
    space = KeySpace("app:convlock")
    for cid in [*HOSTILE, "plain"]:
        keys = space.keys(cid)
        slots = {key_slot(k.encode()) for k in (keys.queue, keys.state, keys.wake(1), keys.wake(10**15))}
        assert len(slots) == 1, cid


def test_prefix_namespaces_keys() -> None:
    a, b = KeySpace("tenant_a"), KeySpace("tenant_a:x")
    keys = a.keys("x")
    assert keys.queue.startswith("tenant_a:{")
    assert b.conversation_of(keys.state) is None
    assert a.conversation_of(b.keys("x").state) is None
    assert a.keys("c").queue != b.keys("c").queue


def test_state_pattern_matches_state_keys_only() -> None:
    space = KeySpace("p*[x]?")
    pattern = space.state_pattern()
    for cid in HOSTILE:
        keys = space.keys(cid)
        assert _redis_glob(pattern, keys.state)
        assert not _redis_glob(pattern, keys.queue)
        assert not _redis_glob(pattern, keys.wake(3))
    # The glob characters of the prefix are matched literally.
    assert not _redis_glob(pattern, "pZZx]Q:{a}:s")


def test_foreign_keys_are_not_conversations() -> None:
    space = KeySpace("convlock")
    for key in ["convlock:{}:s", "convlock:{a%4}:s", "convlock:{a%41}:s", "convlock:{a b}:s", "other:{a}:s"]:
        assert space.conversation_of(key) is None, key


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        KeySpace("p").keys("")
    with pytest.raises(ValueError, match="braces"):
        KeySpace("a{b}")
    with pytest.raises(ValueError, match="bad escape"):
        decode_id("%G0")


def test_lone_surrogates_encode_deterministically() -> None:
    weird = "a\ud800b"
    assert encode_id(weird) == encode_id(weird) == "a%ED%A0%80b"
    assert decode_id(encode_id(weird)) == weird


@given(st.text(min_size=1))
def test_encoding_round_trips(cid: str) -> None:
    assert decode_id(encode_id(cid)) == cid


@given(st.text(min_size=1), st.text(min_size=1))
def test_encoding_is_injective(a: str, b: str) -> None:
    if a != b:
        assert encode_id(a) != encode_id(b)


def test_fast_scan_agrees_with_the_safe_byte_set() -> None:
    """encode_id's regex shortcut must pass exactly the characters it would not escape."""
    from convlock.redis.keys import _NEEDS_ESCAPE, _SAFE

    for code in range(0x3000):
        if 0xD800 <= code < 0xE000:
            continue
        char = chr(code)
        assert (_NEEDS_ESCAPE.search(char) is None) == (code in _SAFE), hex(code)
        assert (encode_id(char) == char) == (code in _SAFE), hex(code)
