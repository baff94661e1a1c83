"""Value types for the command line's options, shared by its sub-commands (``run``, ``verify``, ``locks``).

Each parses one option's text or raises ``argparse.ArgumentTypeError``,
which argparse turns into a usage error naming the option.
"""

from __future__ import annotations

import argparse

__all__ = ["positive_float", "positive_int"]


def positive_float(text: str) -> float:
    """A finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {text!r}")
    return value
