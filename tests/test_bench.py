"""``convlock bench``: the quick run produces numbers for every scenario; the report logic is right.

The figures themselves are for people to read (docs/benchmarks/, README);
here only that each scenario measured something (or said why it could not),
and that the pure parts (ratios, targets, hand-off bookkeeping, scenario
selection) compute what they promise.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from convlock.bench.report import Figure, Results, Target
from convlock.bench.scenarios import SCENARIOS, select
from convlock.bench.scenarios.handoff import summarise

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from convlock.cli import main; sys.exit(main())", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_run_produces_numbers_for_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = bench("--quick", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    data = json.loads((out / "results.json").read_text())
    for scenario in SCENARIOS:
        figures = [f for f in data["figures"] if f["scenario"] == scenario.name]
        skips = [s for s in data["skipped"] if s["scenario"] == scenario.name and s["what"] == "every comparison"]
        assert figures or skips, f"scenario {scenario.name} produced neither figures nor a stated skip"
        for skip in skips:
            assert skip["reason"], skip
        for figure in figures:
            assert figure["value"] is not None, figure
            assert math.isfinite(figure["value"]), figure
            if figure["baseline"] is not None:
                assert (figure["ratio"] or 0) > 0, figure
    # The comparisons are all there.
    baselines = {f["baseline_name"] for f in data["figures"]}
    assert {"asyncio.Lock", "two PINGs", "redis-py asyncio Lock", "bare Starlette echo"} <= baselines
    assert any(name.startswith("raw EVALSHA") for name in baselines)
    assert "python-redis-lock" in baselines  # the bench extra is part of the test extra
    names = " ".join(f["name"] for f in data["figures"] if f["scenario"] == "server")
    assert "long conversation" in names
    assert "commands per uncontended message" in names
    for key in ("python", "cpus", "redis-server"):
        assert key in data["machine"]
    markdown = (out / "results.md").read_text()
    assert "| scenario | figure | value | baseline | ratio | target | met |" in markdown
    assert markdown.count("\n| ") >= len(data["figures"])
    for plot in ("handoff.png", "throughput.png", "server_growth.png"):
        assert (out / plot).read_bytes().startswith(PNG_MAGIC), plot
    assert "scenario 9 locks ls" in result.stderr  # progress is shown as it runs


def test_unknown_scenario_is_a_usage_error_that_lists_the_choices(tmp_path: Path) -> None:
    result = bench("--scenarios", "1,nope", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "unknown scenario 'nope'" in result.stderr
    assert "4=handoff" in result.stderr


def test_endpoints_without_a_redis_lock_store_is_refused(tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yml"
    endpoints.write_text("lock_store:\n  type: in_memory\n")
    result = bench("--endpoints", str(endpoints), "--scenarios", "3", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "type: redis" in result.stderr


def test_memory_scenario_alone_writes_its_figure(tmp_path: Path) -> None:
    result = bench("--quick", "--scenarios", "memory-uncontended", "--out", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert [f["baseline_name"] for f in data["figures"]] == ["asyncio.Lock"]
    assert "redis-server" not in data["machine"]  # no Redis started for an in-memory scenario


def test_select_takes_numbers_and_names_in_scenario_order() -> None:
    assert [s.number for s in select("handoff,1,3")] == [1, 3, 4]
    assert [s.number for s in select("burst")] == [10]
    assert len(select(None)) == len(SCENARIOS)
    with pytest.raises(ValueError, match="unknown scenario"):
        select("99")


def test_figure_ratio_and_targets() -> None:
    ratio = Figure("s", "cycle", 80.0, "cycles/s", 100.0, "floor", target=Target(">=", 0.8))
    assert ratio.ratio == pytest.approx(0.8)
    assert ratio.met is True
    missed = Figure("s", "cycle", 70.0, "cycles/s", 100.0, "floor", target=Target(">=", 0.8))
    assert missed.met is False
    on_value = Figure("s", "commands", 4.1, "commands", target=Target("<=", 2, on="value"))
    assert on_value.ratio is None
    assert on_value.met is False
    unknown = Figure("s", "p99", float("nan"), "ms", target=Target("<=", 2, on="value"))
    assert unknown.met is None
    results = Results(figures=[ratio, missed, on_value, unknown])
    assert results.missed() == [missed, on_value]
    assert results.scenarios_without_output(["s", "t"]) == ["t"]
    results.skip("t", "against x", "x is not installed")
    assert results.scenarios_without_output(["s", "t"]) == []
    text = results.to_markdown()
    assert "| s | cycle | 80.0 cycles/s | 100.0 cycles/s (floor) | 0.80 | ratio >= 0.8 | yes |" in text
    assert "| **no** |" in text
    assert "x is not installed" in text
    assert json.loads(json.dumps(results.to_json()))["figures"][3]["value"] is None  # NaN as null


def test_handoff_summary_counts_only_grants_to_another_process() -> None:
    warm_up = [[i / 100, i / 100 + 0.001, 9.0] for i in range(5)]  # dropped: start-up skew
    holds = [
        [1.000, 1.002, 1.0],
        [1.003, 1.005, 2.0],  # hand-off: 1 ms after process 1 began releasing
        [1.006, 1.008, 2.0],  # process 2 took its own lock back: not a hand-off
        [1.010, 1.012, 1.0],  # hand-off: 2 ms
    ]
    latencies, share = summarise(warm_up + holds)
    assert latencies == pytest.approx([0.001, 0.002])
    assert share == pytest.approx(2 / 3)
