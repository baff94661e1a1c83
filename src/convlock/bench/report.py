"""The figures of one run, and how they are written: ``results.json`` and ``results.md``.

A :class:`Figure` is one measured value next to the baseline it is compared
with in the same run, their ratio, and the target the ratio (or the value)
is held to. A :class:`Skip` records a comparison that did not run and why
(a baseline library missing): the report shows it, it is never faked.
Pure: nothing here measures or touches the network.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Figure", "Results", "Skip", "Target"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Target:
    """``ratio >= 0.8`` and the like; ``on`` says whether the ratio or the value is checked."""

    op: str
    threshold: float
    on: str = "ratio"

    def met(self, value: float, ratio: float | None) -> bool | None:
        """True or False, or None when the checked number is missing (NaN)."""
        subject = ratio if self.on == "ratio" else value
        if subject is None or math.isnan(subject):
            return None
        return _OPS[self.op](subject, self.threshold)

    def __str__(self) -> str:
        return f"{self.on} {self.op} {self.threshold:g}"


@dataclass
class Figure:
    """One row of the report: ``value`` against ``baseline`` in the same run."""

    scenario: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None
    target: Target | None = None
    note: str = ""
    met: bool | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline:
            self.ratio = self.value / self.baseline
        self.met = self.target.met(self.value, self.ratio) if self.target else None


@dataclass(frozen=True)
class Skip:
    """A scenario or comparison that did not run, and why."""

    scenario: str
    what: str
    reason: str


@dataclass
class Results:
    """Every figure and skip of a run, plus the machine it ran on and raw series for plots."""

    machine: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        """Record ``figure`` and return it."""
        self.figures.append(figure)
        return figure

    def skip(self, scenario: str, what: str, reason: str) -> None:
        """Record that ``what`` of ``scenario`` did not run, and why."""
        self.skips.append(Skip(scenario, what, reason))

    def scenarios_without_output(self, scenarios: list[str]) -> list[str]:
        """The scenarios that produced neither a figure nor a stated skip."""
        seen = {f.scenario for f in self.figures} | {s.scenario for s in self.skips}
        return [name for name in scenarios if name not in seen]

    def missed(self) -> list[Figure]:
        """Figures whose target was not met."""
        return [f for f in self.figures if f.met is False]

    def to_json(self) -> dict[str, Any]:
        """Everything, for ``results.json`` (NaN written as null)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {key: clean(item) for key, item in value.items()}
            if isinstance(value, list | tuple):
                return [clean(item) for item in value]
            return value

        figures = []
        for figure in self.figures:
            row = asdict(figure)
            row["target"] = str(figure.target) if figure.target else None
            figures.append(row)
        cleaned: dict[str, Any] = clean(
            {
                "machine": self.machine,
                "titles": self.titles,
                "figures": figures,
                "skipped": [asdict(skip) for skip in self.skips],
                "series": self.series,
            }
        )
        return cleaned

    def to_markdown(self) -> str:
        """A table with one row per figure: value, baseline, ratio, target; then the skips."""
        lines = ["# convlock bench results", ""]
        if self.machine:
            lines += ["## Machine", ""]
            lines += [f"- {key}: {value}" for key, value in self.machine.items()]
            lines.append("")
        lines += [
            "## Figures",
            "",
            "Every ratio is value ÷ baseline, both measured in this run in interleaved blocks.",
            "",
            "| scenario | figure | value | baseline | ratio | target | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in self.figures:
            title = self.titles.get(f.scenario, f.scenario)
            baseline = f"{_num(f.baseline)} {f.unit} ({f.baseline_name})" if f.baseline is not None else "—"
            ratio = _num(f.ratio) if f.ratio is not None else "—"
            met = {True: "yes", False: "**no**", None: "—"}[f.met]
            name = f"{f.name} ({f.note})" if f.note else f.name
            lines.append(
                f"| {title} | {name} | {_num(f.value)} {f.unit} | {baseline} | {ratio} | "
                f"{f.target or '—'} | {met} |"
            )
        if self.skips:
            lines += ["", "## Skipped", ""]
            lines += [
                f"- {self.titles.get(s.scenario, s.scenario)}: {s.what}: {s.reason}" for s in self.skips
            ]
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> list[Path]:
        """Write ``results.json`` and ``results.md`` into ``out``; return their paths."""
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / "results.json"
        json_path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        md_path = out / "results.md"
        md_path.write_text(self.to_markdown(), encoding="utf-8")
        return [json_path, md_path]


def _num(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1 or magnitude == 0:
        return f"{value:.2f}"
    return f"{value:.3g}"
