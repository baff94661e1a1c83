"""``bench/server.py`` still runs end to end and prints every figure (the figures are read by people)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_server_bench_prints_rates_latencies_and_lock_share() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "server.py"), "--blocks", "1", "--concurrency", "2", "--messages", "3"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for setup in ("1 replica, redis", "2 replicas, redis", "1 replica, memory"):
        row = next(line for line in lines if line.startswith(setup))
        assert len(row.removeprefix(setup).split()) == 7, row
        assert row.rstrip().endswith("%")
    assert any(line.startswith("2 replicas / 1 replica throughput: ") for line in lines)
