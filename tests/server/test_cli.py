"""``convlock run`` refuses bad set-ups before it listens: one message naming the key, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from server_procs import write_endpoints

from convlock.cli import main

REDIS = {"type": "redis", "url": "127.0.0.1", "port": 1}  # never contacted: refused before connecting


@pytest.mark.parametrize(("config", "args", "message"), [
    ({"lock_store": {"type": "redis", "port": "abc"}}, [], "lock_store.port: got 'abc'"),
    ({"tracker_store": {"type": "redis", "db": -1}}, [], "tracker_store.db"),
    ({"tracker_store": {"type": "mongo"}}, [], "tracker_store.type: got 'mongo'"),
    ({}, ["--workers", "2"], "--workers 2: workers are separate processes and the in-memory lock store"),
    ({"lock_store": REDIS}, ["--workers", "3"], "--workers 3: workers are separate processes and the in-memory tracker"),
    ({"tracker_store": REDIS}, [], "lock_store.type: the in-memory lock store restarts its tickets"),
    ({"lock_store": {**REDIS, "lifetime": 60}, "tracker_store": {**REDIS, "expire_after": 100}}, [],
     "tracker_store.expire_after: got 100"),
    ({}, ["--handler", "no_such_module:handler"], "--handler: cannot import module 'no_such_module'"),
    ({}, ["--handler", "json:dumps"], "is not an async callable"),
    ({}, ["--handler", "json:nothing"], "has no attribute 'nothing'"),
    ({}, ["--handler", "nocolon"], "give it as 'module:callable'"),
    ({}, ["--port", "70000"], "--port: got 70000"),
])
def test_bad_setups_exit_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: dict[str, Any], args: list[str], message: str
) -> None:
    path = write_endpoints(tmp_path / "endpoints.yml", config)
    assert main(["run", "--endpoints", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("convlock run: ")


def test_a_missing_endpoints_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--endpoints", str(tmp_path / "nope.yml")]) == 2
    assert "nope.yml' does not exist" in capsys.readouterr().err


def test_the_console_script_prints_no_traceback(tmp_path: Path) -> None:
    path = write_endpoints(tmp_path / "endpoints.yml", {"lock_store": {"type": "redis", "port": "abc"}})
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from convlock.cli import main; sys.exit(main())",
         "run", "--endpoints", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "lock_store.port" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--handler-timeout", "-1"])
    assert exited.value.code == 2
    assert "expected a positive number of seconds" in capsys.readouterr().err
