"""Sparsity / fidelity trade-off plots (matplotlib, Agg): every run a point, each series' Pareto
frontier drawn as a line. Upgrade runs get a panel per teacher family with a series per stage
(teacher, RSAE-init, RSAE, teacher-FT); other runs share a panel with a series per architecture.
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


# Upgrade stages keep one colour in every panel, so teacher / RSAE / control read the same across plots.
STAGE_COLORS = {"teacher": "#7f7f7f", "RSAE-init": "#bcbd22", "RSAE": "#d62728", "teacher-FT": "#1f77b4"}


def panel_points(runs: Sequence[Run], metric: str) -> dict[str, dict[str, list[tuple[float, float, str]]]]:
    """{panel: {series: [(l0, value, run name)]}} over successful runs that have both numbers.

    Upgrade runs get one panel per teacher family (series: the stages, so each family's teacher,
    RSAE and control curves sit together); other runs share one panel, a series per architecture.
    Points on different models are never compared: the model joins the panel's name."""
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    several_models = len({r.info.get("model") for r in runs if r.status == "ok"}) > 1
    for r in runs:
        if r.status != "ok":
            continue
        if r.kind == "upgrade" and r.stages:
            panel = f"{r.info.get('teacher') or '?'} teacher"
            sources = {STAGES.get(s, s): v for s, v in r.stages.items()}
        else:
            panel, sources = "SAEs", {r.architecture: r.metrics}
        if several_models:
            panel = f"{panel} | {r.info.get('model') or '?'}"
        for series, values in sources.items():
            x, y = values.get("l0"), values.get(metric)
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                out[panel][series].append((x, y, r.name))
    return {panel: dict(series) for panel, series in out.items()}


def _plain_log_ticks(axis) -> None:
    """Ticks 1, 2, 5, 10, 20, 50 on a log axis, labelled as plain numbers (not 2x10^1)."""
    from matplotlib import ticker

    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def plot_tradeoff(runs: Sequence[Run], metric: str, lower_is_better: bool, path: Path, ylabel: str) -> Path | None:
    panels = panel_points(runs, metric)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows + 0.5), dpi=110, squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, data) in zip(axes.flat, sorted(panels.items())):
        for i, (series, pts) in enumerate(sorted(data.items())):
            c = STAGE_COLORS.get(series, cycle[i % len(cycle)])
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=c, alpha=0.45, s=22)
            front = pareto_frontier([(p[0], p[1]) for p in pts], lower_is_better)
            ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color=c, ms=5, lw=1.6,
                    label=f"{series} ({len(pts)})")
        xs = [p[0] for pts in data.values() for p in pts]
        ys = [p[1] for pts in data.values() for p in pts]
        if min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
        if lower_is_better and min(ys) > 0 and max(ys) / min(ys) > 50:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("L0 (mean active latents per token)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    arrow = "lower" if lower_is_better else "higher"
    fig.suptitle(f"{metric} vs L0 ({arrow} is better; lines: Pareto frontiers)", fontsize=10)
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
