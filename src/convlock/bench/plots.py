"""PNG plots of a run, drawn from ``Results.series`` with matplotlib (the ``bench`` extra).

* ``handoff.png``: hand-off latency distributions, ours against the baselines,
  for 2, 4 and 8 processes (box plots on a log scale);
* ``throughput.png``: cycles/s against the number of conversations, per number
  of processes, with the raw EVALSHA baseline (÷ 2) dashed;
* ``server_growth.png``: server latency against conversation length.

A plot whose series the run did not produce is not drawn. Without matplotlib
nothing is drawn and :func:`draw` says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["draw"]


def draw(series: dict[str, Any], out: Path) -> tuple[list[Path], str | None]:
    """Draw every plot the series allow into ``out``; return the files and why none, if none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'convlock[bench]')"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "handoff_ms" in series:
        data: dict[str, dict[str, list[float]]] = series["handoff_ms"]
        counts = sorted({count for per in data.values() for count in per}, key=int)
        figure, axes = plt.subplots(1, len(counts), figsize=(4 * len(counts), 4), sharey=True)
        for axis, count in zip(axes if len(counts) > 1 else [axes], counts, strict=True):
            libs = [lib for lib in data if data[lib].get(count)]
            axis.boxplot([[max(x, 1e-3) for x in data[lib][count]] for lib in libs], whis=(1, 99))
            axis.set_xticks(range(1, len(libs) + 1), libs, rotation=20)
            axis.set_yscale("log")
            axis.set_title(f"{count} processes")
            axis.grid(True, axis="y", alpha=0.3)
        axes_list = axes if len(counts) > 1 else [axes]
        axes_list[0].set_ylabel("hand-off latency (ms, log; whiskers p1-p99)")
        figure.suptitle("Redis hand-off latency: release started → next process holds the lock")
        figure.tight_layout()
        written.append(_save(figure, out / "handoff.png", plt))
    if "throughput" in series:
        table: dict[str, list[list[float]]] = series["throughput"]
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for index, (processes, rows) in enumerate(sorted(table.items())):
            color = f"C{index}"
            xs = [row[0] for row in rows]
            axis.plot(xs, [row[1] for row in rows], "o-", color=color, label=f"convlock, {processes} proc")
            axis.plot(xs, [row[2] / 2 for row in rows], "x--", color=color,
                      label=f"raw EVALSHA ÷ 2, {processes} proc")
        axis.set_xscale("log")
        axis.set_xlabel("conversations (one task each, per process)")
        axis.set_ylabel("lock cycles/s (all processes)")
        axis.set_title("Redis throughput against the number of conversations")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        written.append(_save(figure, out / "throughput.png", plt))
    if "server_growth_ms" in series:
        growth: dict[str, list[list[float]]] = series["server_growth_ms"]
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for name, points in growth.items():
            axis.plot([p[0] for p in points], [p[1] for p in points], label=f"convlock run, {name} stores")
        axis.set_xlabel("message number in the conversation")
        axis.set_ylabel("latency (ms, median of each bucket)")
        axis.set_title("Server latency against conversation length (one client)")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend()
        figure.tight_layout()
        written.append(_save(figure, out / "server_growth.png", plt))
    return written, None


def _save(figure: Any, path: Path, plt: Any) -> Path:
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
