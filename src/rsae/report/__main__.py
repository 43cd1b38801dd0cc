"""`python -m rsae.report <run dirs or globs> --out <dir>`: tables and plots from run outputs.

Writes `table.md`, `table.csv`, `table.tex`, `runs.json` and the trade-off plots
(`mse_vs_l0.png`, `loss_recovered_vs_l0.png` when downstream metrics exist) under `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from rsae import jsonfile
from rsae.report.collect import collect
from rsae.report.plots import write_plots
from rsae.report.tables import latex_runs, latex_upgrade, markdown_runs, markdown_upgrade, write_csv


def build_report(paths: Sequence[str], out: str | Path, title: str = "rsae results") -> dict:
    """Collect runs under `paths` and write the report into `out`; returns what was written."""
    runs = collect(paths)
    if not runs:
        raise FileNotFoundError(f"no run directories (metrics.json / eval.json / upgrade.json / .hydra) under {', '.join(map(str, paths))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    upgrades = [r for r in runs if r.kind == "upgrade" and (r.stages or r.status != "ok")]
    others = [r for r in runs if r not in upgrades]
    md, tex = [f"# {title}\n"], []
    if upgrades:
        md += ["## Upgrades (teacher -> RSAE)\n", markdown_upgrade(upgrades)]
        tex += ["% Upgrades (teacher -> RSAE)", latex_upgrade(upgrades)]
    for kind in dict.fromkeys(r.kind for r in others):
        group = [r for r in others if r.kind == kind]
        md += [f"## {kind.capitalize()} runs\n", markdown_runs(group)]
        tex += [f"% {kind} runs", latex_runs(group)]
    plots = write_plots(runs, out)
    if plots:
        md.append("## Plots\n")
        md += [f"![{p.stem}]({p.name})\n" for p in plots]
    (out / "table.md").write_text("\n".join(md), encoding="utf-8")
    (out / "table.tex").write_text("\n".join(tex), encoding="utf-8")
    write_csv(out / "table.csv", runs)
    records = [{**dataclasses.asdict(r), "path": str(r.path)} for r in runs]
    (out / "runs.json").write_text(jsonfile.dumps(records, indent=1), encoding="utf-8")
    return {"runs": runs, "plots": plots, "out": out}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsae.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run directories, sweep directories or globs (searched recursively)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--title", default="rsae results")
    args = parser.parse_args(argv)
    try:
        result = build_report(args.paths, args.out, args.title)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    runs = result["runs"]
    failed = sum(r.status == "failed" for r in runs)
    interrupted = sum(r.status == "interrupted" for r in runs)
    print(f"{len(runs)} runs ({failed} failed{f', {interrupted} interrupted' if interrupted else ''}) -> "
          f"{result['out']}/table.md, table.csv, table.tex"
          + "".join(f", {p.name}" for p in result["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
