"""Drive Debian's headless Chromium from tests: the DOM after load, and screenshots.

``find_chromium()`` returns the binary or None (tests skip, naming why);
scripts/test installs the ``chromium`` package when it is missing and it
runs as root. Each call starts a fresh browser with its own profile folder,
no network services of its own (no sync, updates or QUIC), and a timeout.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

__all__ = ["CHROMIUM_ENV", "dump_dom", "find_chromium", "png_size", "screenshot"]

CHROMIUM_ENV = "CONVLOCK_CHROMIUM"
TIMEOUT = 90.0


def find_chromium() -> str | None:
    """``$CONVLOCK_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on PATH, else None."""
    configured = os.environ.get(CHROMIUM_ENV, "").strip()
    if configured:
        return configured
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(binary: str, url: str, *flags: str) -> subprocess.CompletedProcess[bytes]:
    with tempfile.TemporaryDirectory(prefix="convlock-chromium-") as profile:
        argv = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", *flags, url,
        ]
        result = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited with {result.returncode}: {result.stderr.decode(errors='replace')[-2000:]}")
    return result


def dump_dom(binary: str, url: str) -> str:
    """The page's DOM once loaded (scripts, had any run, included), as HTML text."""
    return _run(binary, url, "--dump-dom").stdout.decode("utf-8")


def screenshot(binary: str, url: str, path: Path, *, width: int = 1100, height: int = 760) -> Path:
    """Render ``url`` at ``width`` x ``height`` into the PNG ``path``."""
    _run(binary, url, f"--screenshot={path}", f"--window-size={width},{height}")
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {path}")
    return path


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; raises ``ValueError`` for anything else."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    width, height = struct.unpack(">II", head[16:24])
    return width, height
