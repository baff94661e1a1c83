"""``convlock locks ls|show|release`` against a real Redis, with holders and waiters in other processes."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from convlock.cli import main
from redis_procs import ClusterSetup, RedisProcess, free_port

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-c", "import sys; from convlock.cli import main; sys.exit(main())"]


def write_endpoints(path: Path, redis: RedisProcess | None, *, port: int | None = None) -> Path:
    connection: dict[str, Any] = {
        "url": "127.0.0.1",
        "port": port if port is not None else redis.port if redis else 1,
        "db": 0,
        "socket_timeout": 2,
    }
    config = {
        "lock_store": {"type": "redis", "lifetime": 30, **connection},
        "tracker_store": {"type": "redis", **connection},
    }
    file = path / "endpoints.yml"
    file.write_text(yaml.safe_dump(config), encoding="utf-8")
    return file


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``convlock ARGS`` in this process (an interpreter start costs seconds on a loaded machine)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        if cwd is not None:
            stack.enter_context(contextlib.chdir(cwd))
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's usage errors
            code = int(exit_.code or 0)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def cli_process(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``convlock ARGS`` as its own process, as an operator would."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


class Worker:
    """One ops_worker.py process; ``expect(prefix)`` reads its next line."""

    def __init__(self, mode: str, endpoints: Path, conversation_id: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(HERE / "ops_worker.py"), mode, str(endpoints), conversation_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def line(self) -> str:
        assert self.popen.stdout is not None
        text = self.popen.stdout.readline().strip()
        if not text:
            _, err = self.popen.communicate(timeout=10)
            raise AssertionError(f"worker ended without output: {err}")
        return text

    def send(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.communicate(timeout=10)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def wait_for_queue(endpoints: Path, conversation_id: str, waiting: int) -> dict[str, Any]:
    """Poll ``locks show --json`` until ``waiting`` tickets queue behind a holder."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = cli("locks", "show", conversation_id, "--endpoints", str(endpoints), "--json")
        shown: dict[str, Any] = json.loads(result.stdout)
        if shown["serving"] is not None and len(shown["waiting"]) == waiting:
            return shown
        time.sleep(0.1)
    raise AssertionError(f"{conversation_id} never had {waiting} waiters")


@pytest.mark.slow
def test_ls_and_show_report_the_holder_the_queue_and_the_waits(
    redis_server: RedisProcess, tmp_path: Path, workers: list[Worker]
) -> None:
    endpoints = write_endpoints(tmp_path, redis_server)
    holder = Worker("hold", endpoints, "alice")
    workers.append(holder)
    held = int(holder.line().split()[1])
    workers.extend(Worker("wait", endpoints, "alice") for _ in range(2))
    shown = wait_for_queue(endpoints, "alice", 2)
    assert shown["serving"]["ticket"] == held
    assert all(lease["waited"] >= 0 for lease in shown["waiting"])
    assert shown["waiting"][0]["ticket"] < shown["waiting"][1]["ticket"]

    table = cli("locks", "ls", "--endpoints", str(endpoints))
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["CONVERSATION", "HOLDER", "WAITING", "OLDEST", "WAIT", "LEASE", "LEFT"]
    cells = row.split()
    assert cells[:3] == ["alice", str(held), "2"]
    assert cells[3].endswith("s")
    assert cells[4].endswith("s")
    assert 0 < float(cells[4].rstrip("s")) <= 30

    listed = json.loads(cli("locks", "ls", "--endpoints", str(endpoints), "--json").stdout)
    assert listed["truncated"] is False
    [lock] = listed["locks"]
    assert (lock["conversation_id"], lock["holder_ticket"], lock["waiting"]) == ("alice", held, 2)
    assert lock["oldest_wait"] == max(w["waited"] for w in lock["queue"]["waiting"])

    detail = cli("locks", "show", "alice", "--endpoints", str(endpoints))
    assert detail.returncode == 0
    assert "holding" in detail.stdout
    assert "waiting #2" in detail.stdout


@pytest.mark.slow
def test_release_unblocks_a_waiter_in_another_process_and_fences_out_the_revoked_holder(
    redis_server: RedisProcess, tmp_path: Path, workers: list[Worker]
) -> None:
    endpoints = write_endpoints(tmp_path, redis_server)
    holder = Worker("hold", endpoints, "stuck")
    workers.append(holder)
    old_ticket = int(holder.line().split()[1])
    waiter = Worker("wait", endpoints, "stuck")
    workers.append(waiter)
    wait_for_queue(endpoints, "stuck", 1)

    released = cli_process("locks", "release", "stuck", "--endpoints", str(endpoints))
    assert released.returncode == 0, released.stderr
    assert f"revoked ticket {old_ticket} (the holder)" in released.stdout
    # The waiter is served at once (its wake-up is pushed), not after the 30 s lease.
    start = time.monotonic()
    granted = waiter.line()
    assert granted.startswith("granted ")
    assert waiter.line() == "loaded"
    assert time.monotonic() - start < 10
    new_ticket = int(granted.split()[1])
    assert new_ticket > old_ticket

    holder.send("save")
    assert holder.line() == f"refused {new_ticket}", "the revoked holder's fenced write must be refused"
    assert holder.line() == "lost True"

    again = cli("locks", "release", "stuck", "--endpoints", str(endpoints))
    assert again.returncode == 1, "nothing is held any more"
    assert "nothing revoked" in again.stdout


@pytest.mark.slow
def test_release_of_one_waiting_ticket_revokes_only_that_waiter(
    redis_server: RedisProcess, tmp_path: Path, workers: list[Worker]
) -> None:
    endpoints = write_endpoints(tmp_path, redis_server)
    holder = Worker("hold", endpoints, "c")
    workers.append(holder)
    held = int(holder.line().split()[1])
    waiter = Worker("wait", endpoints, "c")
    workers.append(waiter)
    queued = wait_for_queue(endpoints, "c", 1)["waiting"][0]["ticket"]

    wrong = cli("locks", "release", "c", "--ticket", "12345", "--endpoints", str(endpoints), "--json")
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout)["revoked_ticket"] is None

    released = cli("locks", "release", "c", "--ticket", str(queued), "--endpoints", str(endpoints), "--json")
    assert released.returncode == 0, released.stderr
    assert json.loads(released.stdout) == {
        "conversation_id": "c", "revoked_ticket": queued, "was_holder": False, "serving": held,
    }
    assert waiter.line() == "revoked"
    shown = json.loads(cli("locks", "show", "c", "--endpoints", str(endpoints), "--json").stdout)
    assert shown["serving"]["ticket"] == held
    assert shown["waiting"] == []
    holder.send("save")
    assert holder.line() == "saved", "the holder was not touched"


def test_ls_pages_with_scan_through_100000_idle_conversations(redis_server: RedisProcess, tmp_path: Path) -> None:
    endpoints = write_endpoints(tmp_path, redis_server)
    # 100,000 conversations with stored state but no lock, written server-side in one script.
    redis_server.command(
        "EVAL",
        "for i = 1, 100000 do redis.call('HSET', 'convlock:tracker:{idle' .. i .. '}', 'n', '0') end",
        0,
    )
    redis_server.command("CONFIG", "RESETSTAT")
    now_us = int(time.time() * 1_000_000)
    for i in range(3):  # three held locks, written as the issue script writes them
        redis_server.command(
            "HSET", f"convlock:{{busy{i}}}:s", "n", now_us + i, "h", now_us + i,
            "e", now_us + 60_000_000, "l", 60_000_000, "o", "", "x", now_us + 60_000_000,
        )
    start = time.monotonic()
    result = cli_process("locks", "ls", "--endpoints", str(endpoints), "--json")
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    found = sorted(lock["conversation_id"] for lock in json.loads(result.stdout)["locks"])
    assert found == ["busy0", "busy1", "busy2"]
    stats = redis_server.command("INFO", "commandstats")
    assert "cmdstat_keys" not in stats, "listing must never use KEYS"
    assert stats["cmdstat_scan"]["calls"] >= 100_000 // 1000, "SCAN pages through the keyspace"
    print(f"locks ls over 100,003 keys: {elapsed:.2f}s including interpreter start")

    limited = json.loads(cli("locks", "ls", "--limit", "2", "--endpoints", str(endpoints), "--json").stdout)
    assert len(limited["locks"]) == 2
    assert limited["truncated"] is True
    table = cli("locks", "ls", "--limit", "2", "--endpoints", str(endpoints)).stdout
    assert "(first 2 shown; use --limit to see more)" in table


def test_exit_codes_for_missing_things_and_bad_setups(redis_server: RedisProcess, tmp_path: Path) -> None:
    endpoints = write_endpoints(tmp_path, redis_server)
    assert cli("locks", "show", "nobody", "--endpoints", str(endpoints)).returncode == 1
    empty = cli("locks", "ls", "--endpoints", str(endpoints))
    assert (empty.returncode, empty.stdout.strip()) == (0, "no conversation is locked")

    missing = cli("locks", "ls", "--endpoints", str(tmp_path / "nope.yml"))
    assert missing.returncode == 2
    assert "nope.yml' does not exist" in missing.stderr
    default = cli("locks", "ls", cwd=tmp_path / "..")  # no endpoints.yml in that folder
    assert default.returncode == 2
    assert "'endpoints.yml' does not exist" in default.stderr

    memory = tmp_path / "memory.yml"
    memory.write_text("lock_store:\n  type: in_memory\n", encoding="utf-8")
    refused = cli("locks", "ls", "--endpoints", str(memory))
    assert refused.returncode == 2
    assert "in_memory" in refused.stderr
    assert "Traceback" not in refused.stderr

    down = write_endpoints(tmp_path, None, port=free_port())
    unreachable = cli("locks", "ls", "--endpoints", str(down))
    assert unreachable.returncode == 2
    assert "lock store unavailable: Redis at 127.0.0.1" in unreachable.stderr

    usage = cli("locks", "release", "x", "--ticket", "zero", "--endpoints", str(endpoints))
    assert usage.returncode == 2
    assert "expected a whole number" in usage.stderr


def test_the_table_cannot_be_forged_by_an_id() -> None:
    from convlock.cli_locks import format_table, printable

    assert printable("alice") == "alice"
    assert printable("evil\nalice  1  0") == "'evil\\nalice  1  0'", "a newline would forge a row"
    assert printable("\x1b[31mred") == "'\\x1b[31mred'", "terminal escapes are shown, not run"
    assert printable(" padded") == "' padded'"
    rows = [{"conversation_id": "a\nb", "holder_ticket": 7, "waiting": 0, "oldest_wait": None, "lease_left": 1.25}]
    table = format_table(rows, truncated=False, limit=10)
    assert table.splitlines()[1].split() == ["'a\\nb'", "7", "0", "-", "1.2s"]


@pytest.mark.slow
def test_ls_show_and_release_on_a_redis_cluster(
    redis_cluster: ClusterSetup, tmp_path: Path, workers: list[Worker]
) -> None:
    connection = {"deployment_mode": "cluster", "endpoints": redis_cluster.endpoints(), "socket_timeout": 2,
                  "key_prefix": "ops-cluster"}
    endpoints = tmp_path / "endpoints.yml"
    endpoints.write_text(yaml.safe_dump({
        "lock_store": {"type": "redis", "lifetime": 30, **connection},
        "tracker_store": {"type": "redis", **connection},
    }), encoding="utf-8")
    names = ["c-one", "c-two", "c-three"]  # spread over the cluster's nodes
    holders = {name: Worker("hold", endpoints, name) for name in names}
    workers.extend(holders.values())
    tickets = {name: int(worker.line().split()[1]) for name, worker in holders.items()}
    assert len({redis_cluster.node_for_key(f"ops-cluster:{{{name}}}:s").port for name in names}) > 1

    listed = json.loads(cli("locks", "ls", "--endpoints", str(endpoints), "--json").stdout)
    assert {lock["conversation_id"]: lock["holder_ticket"] for lock in listed["locks"]} == tickets
    released = cli("locks", "release", "c-two", "--endpoints", str(endpoints))
    assert released.returncode == 0
    assert f"revoked ticket {tickets['c-two']}" in released.stdout
    assert cli("locks", "show", "c-two", "--endpoints", str(endpoints)).returncode == 1
