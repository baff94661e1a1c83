"""The ``convlock`` command line (placeholder until the server lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``convlock`` console script."""
    print("convlock: the server is not available yet", file=sys.stderr)
    return 2
