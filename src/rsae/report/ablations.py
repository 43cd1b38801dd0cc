"""The ablation table of `python -m rsae.paper --ablations`: per row, its teacher, RSAE and control
(`<out>/upgrades/<row>`) and one line per ablation (`<out>/ablations/<row>/<name>`), each an
upgrade with one setting changed, compared by held-out MSE with the row's RSAE and control."""

from __future__ import annotations

import json
from pathlib import Path

from rsae.report.collect import Run, read_run
from rsae.report.tables import _md_escape, fmt

COLUMNS = ("mse", "l0", "fvu", "loss_recovered", "kl", "alive")
HEADER = "| run | overrides | MSE | L0 | FVU | loss rec. | KL | alive | MSE vs RSAE | MSE vs control |"


def _pct(a: float | None, b: float | None) -> str:
    return f"{round(100 * (a - b) / b, 1) + 0.0:+.1f}%" if a is not None and b else ""  # + 0.0: no "-0.0%"


def _finished(run_dir: Path) -> bool:
    """metrics.json says ok: an upgrade killed after writing upgrade.json has none."""
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def _line(label: str, overrides: str, values: dict, rsae: dict, control: dict) -> str:
    cells = [fmt(values.get(c)) for c in COLUMNS]
    mse = values.get("mse")
    return (f"| {label} | {overrides} | " + " | ".join(cells)
            + f" | {_pct(mse, rsae.get('mse'))} | {_pct(mse, control.get('mse'))} |")


def row_table(row: Path, ablations: dict[str, list[str]]) -> str:
    """One row's table: `row` is `<out>/upgrades/<row>`; its ablations sit in `<out>/ablations/<row>`."""
    base = read_run(row) if row.is_dir() else Run(path=row, kind="upgrade", status="failed", error="not run")
    teacher, rsae, control = (base.stages.get(s, {}) for s in ("teacher", "rsae", "teacher_ft"))
    lines = [f"### {row.name}\n", HEADER, "|---|---|" + "---:|" * (len(COLUMNS) + 2)]
    if base.status != "ok":
        lines.append(f"| row | | {base.status}: {_md_escape(base.error)} |" + " |" * (len(COLUMNS) + 1))
    for label, values in (("teacher", teacher), ("RSAE (defaults)", rsae), ("control (defaults)", control)):
        if values:
            lines.append(_line(label, "", values, rsae, control))
    root = row.parent.parent / "ablations" / row.name
    for adir in sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []:
        run = read_run(adir)
        if run.status == "ok" and not _finished(adir):
            run.status, run.error = "incomplete", "no metrics.json (stopped before the end)"

        overrides = " ".join(f"`{o}`" for o in ablations.get(adir.name, []))
        if run.status != "ok":
            lines.append(f"| {adir.name} | {overrides} | {run.status}: {_md_escape(run.error)} |" + " |" * (len(COLUMNS) + 1))
            continue
        lines.append(_line(f"{adir.name}: RSAE", overrides, run.stages.get("rsae", {}), rsae, control))
        if run.stages.get("teacher_ft"):  # an ablation that trains its own control (e.g. a longer fine-tune)
            lines.append(_line(f"{adir.name}: control", overrides, run.stages["teacher_ft"], rsae, control))
    return "\n".join(lines) + "\n"


def write_ablations(out: Path, ablations: dict[str, list[str]], dest: Path) -> Path | None:
    """`dest` (markdown) with a table for every row of `out` that has ablations; None when none has."""
    root = out / "ablations"
    rows = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not rows:
        return None
    text = ["# Ablations\n", "Each line below a row's defaults is one upgrade of the row's teacher with the "
            "settings shown; MSE vs RSAE / control compare it with the row's own RSAE and control "
            "(negative: lower MSE).\n"]
    text += [row_table(out / "upgrades" / name, ablations) for name in rows]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(text), encoding="utf-8")
    return dest
