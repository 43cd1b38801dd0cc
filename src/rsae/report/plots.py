"""Sparsity / fidelity trade-off plots (matplotlib, Agg): one series per architecture (upgrade
runs: one per stage), every run a point, and each series' Pareto frontier drawn as a line.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from rsae.report.collect import STAGES, Run

# (y metric, lower is better, file name, axis label)
PLOTS = (
    ("mse", True, "mse_vs_l0.png", "MSE (sum over dims, raw units)"),
    ("loss_recovered", False, "loss_recovered_vs_l0.png", "loss recovered"),
)


def pareto_frontier(points: Sequence[tuple[float, float]], lower_is_better: bool = True) -> list[tuple[float, float]]:
    """Points not dominated by another with L0 <= and y at least as good, sorted by L0."""
    sign = 1 if lower_is_better else -1
    frontier, best = [], math.inf
    for x, y in sorted(points, key=lambda p: (p[0], sign * p[1])):
        if sign * y < best:
            frontier.append((x, y))
            best = sign * y
    return frontier


def series_points(runs: Sequence[Run], metric: str) -> dict[str, list[tuple[float, float, str]]]:
    """{series: [(l0, value, run name)]} over successful runs that have both numbers."""
    out: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    several_models = len({r.info.get("model") for r in runs if r.status == "ok"}) > 1
    for r in runs:
        if r.status != "ok":
            continue
        sources = ({f"{STAGES.get(s, s)} ({r.info.get('teacher') or '?'} teacher)": v for s, v in r.stages.items()}
                   if r.kind == "upgrade" and r.stages else {r.architecture: r.metrics})
        if several_models:  # points on different data are not comparable: separate series
            sources = {f"{name} | {r.info.get('model') or '?'}": v for name, v in sources.items()}
        for series, values in sources.items():
            x, y = values.get("l0"), values.get(metric)
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                out[series].append((x, y, r.name))
    return dict(out)


def plot_tradeoff(runs: Sequence[Run], metric: str, lower_is_better: bool, path: Path, ylabel: str) -> Path | None:
    data = series_points(runs, metric)
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs = [p[0] for pts in data.values() for p in pts]
    ys = [p[1] for pts in data.values() for p in pts]
    for i, (series, pts) in enumerate(sorted(data.items())):
        c = colors[i % len(colors)]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=c, alpha=0.45, s=22)
        front = pareto_frontier([(p[0], p[1]) for p in pts], lower_is_better)
        ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color=c, ms=5, lw=1.6,
                label=f"{series} ({len(pts)})")
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    if lower_is_better and min(ys) > 0 and max(ys) / min(ys) > 50:
        ax.set_yscale("log")
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel(ylabel)
    arrow = "lower" if lower_is_better else "higher"
    ax.set_title(f"{metric} vs L0 ({arrow} is better; lines: Pareto frontiers)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    written = []
    for metric, lower, name, label in PLOTS:
        path = plot_tradeoff(runs, metric, lower, Path(out_dir) / name, label)
        if path is not None:
            written.append(path)
    return written
