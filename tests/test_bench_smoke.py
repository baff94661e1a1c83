"""The benchmark scripts still run end to end and print every figure.

The figures themselves are for people to read (README, docs/); here only
that each script runs, with a small workload, and reports what it promises.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``bench/<script>`` with this interpreter and capture its output."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_memory_bench_prints_both_ratios() -> None:
    result = run_bench("memory_lock.py", "--blocks", "2")
    assert result.returncode in (0, 1), result.stderr  # 1 only means a ratio above target
    lines = result.stdout.splitlines()
    assert any(line.startswith("uncontended") and "ratio" in line for line in lines), result.stdout
    assert any(line.startswith("contended") and "ratio" in line for line in lines), result.stdout


def test_redis_bench_prints_its_figures() -> None:
    # It starts and stops its own redis-server, and cleans up after itself.
    result = run_bench("redis_lock.py", "--blocks", "2", "--handoffs", "30", "--waiters", "50")
    assert result.returncode in (0, 1), result.stderr  # 1 only means a target was missed
    lines = result.stdout.splitlines()
    assert any(line.startswith("uncontended") and "ratio" in line for line in lines), result.stdout
    assert any(line.startswith("hand-off") and "p99" in line for line in lines), result.stdout
    assert any(line.startswith("burst") and "ratio" in line for line in lines), result.stdout
    assert any(line.startswith("connections") and "peak" in line for line in lines), result.stdout
    assert "keys left in Redis: 0" in lines, result.stdout


@pytest.mark.slow
def test_server_bench_prints_rates_latencies_and_lock_share() -> None:
    result = run_bench("server.py", "--blocks", "1", "--concurrency", "2", "--messages", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for setup in ("1 replica, redis", "2 replicas, redis", "1 replica, memory"):
        row = next(line for line in lines if line.startswith(setup))
        assert len(row.removeprefix(setup).split()) == 7, row
        assert row.rstrip().endswith("%")
    assert any(line.startswith("2 replicas / 1 replica throughput: ") for line in lines)


@pytest.mark.slow
def test_rasa_bench_prints_the_ratio_and_the_contended_workload() -> None:
    # Rasa's stores stall on the contended workload; --deadline bounds each run.
    result = run_bench("rasa_adapter.py", "--blocks", "2", "--messages", "10", "--deadline", "3", "--no-pin")
    assert result.returncode in (0, 1), result.stderr  # 1 only means a target was missed
    lines = result.stdout.splitlines()
    assert any(line.startswith("uncontended ratio convlock / rasa redis: ") for line in lines), result.stdout
    for store in ("convlock", "rasa redis", "rasa concurrent_redis"):
        assert any(line.strip().startswith(store) and "cycles/s" in line for line in lines), result.stdout
        assert any(line.strip().startswith(store) and "lost updates" in line for line in lines), result.stdout
    row = next(line for line in lines if line.strip().startswith("convlock") and "lost updates" in line)
    assert "20/20 messages done" in row, row
    assert " 0 lost updates, 0 LockError" in row, row
    assert any(line.startswith("contended time convlock: ") for line in lines), result.stdout
    assert "keys left in Redis: 0" in lines, result.stdout

def test_locks_ls_bench_prints_its_figures() -> None:
    result = run_bench("locks_ls.py", "--idle", "5000", "--blocks", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("listing") and "ratio" in line for line in lines), result.stdout
    assert any(line.startswith("longest block") and "one KEYS" in line for line in lines), result.stdout
