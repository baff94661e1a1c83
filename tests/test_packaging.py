"""The packaging split: the core installs and runs without the server stack.

``pip install convlock`` brings only redis, pydantic and PyYAML, so that a
framework such as Rasa can load convlock's lock store; ``convlock[server]``
adds the ASGI stack for ``convlock run``. convlock's ranges must also admit
the versions Rasa Pro 3.21 pins, so both install into one environment.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

SERVER_STACK = {"starlette", "uvicorn", "prometheus-client"}


def requirements(distribution: str) -> list[Requirement]:
    return [Requirement(text) for text in metadata.requires(distribution) or []]


def core_and_extra(extra: str) -> tuple[set[str], set[str]]:
    core: set[str] = set()
    in_extra: set[str] = set()
    for requirement in requirements("convlock"):
        name = canonicalize_name(requirement.name)
        if requirement.marker is None:
            core.add(name)
        elif requirement.marker.evaluate({"extra": extra}):
            in_extra.add(name)
    return core, in_extra


def test_the_core_needs_only_redis_pydantic_and_pyyaml() -> None:
    core, server = core_and_extra("server")
    assert core == {"redis", "pydantic", "pyyaml"}
    assert not core & SERVER_STACK
    assert server >= SERVER_STACK


def test_the_core_works_without_the_server_stack_and_run_names_the_extra() -> None:
    code = textwrap.dedent(
        """
        import sys
        for name in ("starlette", "uvicorn", "prometheus_client"):
            sys.modules[name] = None  # as if `pip install convlock` (no extra) had run
        import convlock
        import convlock.integrations.rasa
        from convlock.redis import RedisLockStore
        store = convlock.create_lock_store({"type": "redis", "port": 6390})
        assert isinstance(store, RedisLockStore)
        from convlock.cli import main
        sys.exit(main(["run"]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stderr
    assert "pip install 'convlock[server]'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("name", ["redis", "starlette", "pyyaml"])
def test_ranges_admit_what_rasa_pro_pins(name: str) -> None:
    # The installed version (scripts/test installs Rasa Pro 3.21's pins)
    # satisfies both convlock's range and Rasa Pro's: the ranges overlap.
    installed = Version(metadata.version(name))
    ours = [r for r in requirements("convlock") if canonicalize_name(r.name) == name]
    rasas = [r for r in requirements("rasa-pro") if canonicalize_name(r.name) == name and r.marker is None]
    assert ours, f"convlock declares no {name} requirement"
    assert rasas, f"rasa-pro declares no {name} requirement"
    for requirement in ours + rasas:
        assert requirement.specifier.contains(installed), f"{name} {installed} is outside {requirement}"


def test_pydantic_2_satisfies_both() -> None:
    # Rasa Pro needs pydantic 2 without pinning it directly.
    installed = Version(metadata.version("pydantic"))
    assert installed.major == 2
    (ours,) = [r for r in requirements("convlock") if canonicalize_name(r.name) == "pydantic"]
    assert ours.specifier.contains(installed)
