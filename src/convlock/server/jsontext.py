"""The server's JSON encodings, strict (no NaN) and compact: text for the stores, ASCII for replies.

A message encodes about five small values (its reply, the handler's state
twice, a user and a bot event). ``json.dumps`` with options builds a new
``JSONEncoder`` per call, and ``JSONEncoder.encode`` builds a new C encoder
per call (with a dict for its circular-reference check): 6.3 us for one
event here, against 3.3 us for a C encoder built once and reused. So each
encoding here reuses one C encoder (``json.encoder.c_make_encoder``, what
``JSONEncoder.iterencode`` itself calls) without the circular check, which
is what makes it reusable: its check keeps per-call state. A value the
fast path refuses with ``RecursionError`` (a cycle, or nesting past the
recursion limit) is encoded again by the checked ``JSONEncoder``, so the
errors are the standard ones: ``ValueError("Circular reference
detected")``, ``TypeError`` for what is not JSON, ``ValueError`` for NaN.
Where the interpreter has no C encoder, the checked encoder does all the work.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable
from typing import Any

__all__ = ["dumps_ascii", "dumps_text"]

_SEPARATORS = (",", ":")


def _reusable(checked: json.JSONEncoder, encode_string: Any) -> Callable[[Any], str]:
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return checked.encode
    sample = {"a": [1.5, "\u00e9", None, True], "b": {}}
    try:
        # The arguments JSONEncoder.iterencode passes, with markers=None (no cycle check).
        fast = make(None, checked.default, encode_string, None, ":", ",", False, False, False)
        agrees = "".join(fast(sample, 0)) == checked.encode(sample)
    except Exception:  # another interpreter's signature: keep to the public API
        agrees = False
    if not agrees:
        return checked.encode

    def encode(value: Any) -> str:
        if type(value) is str:
            return checked.encode(value)
        try:
            return "".join(fast(value, 0))
        except RecursionError:
            return checked.encode(value)  # raises the standard error for a cycle

    return encode


_TEXT = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=_SEPARATORS)
_ASCII = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=_SEPARATORS)

#: ``value`` as compact strict JSON text (non-ASCII kept as is): what the stores keep.
dumps_text: Callable[[Any], str] = _reusable(_TEXT, json.encoder.encode_basestring)
_dumps_ascii = _reusable(_ASCII, json.encoder.encode_basestring_ascii)


def dumps_ascii(value: Any) -> bytes:
    """``value`` as compact strict JSON in ASCII bytes (non-ASCII escaped): what replies send."""
    return _dumps_ascii(value).encode("ascii")
