"""Benchmark tables (Markdown, CSV, LaTeX) from collected runs.

* **Upgrade runs** (`upgrade.json`): the paper's layout, one row per model / teacher, and for
  each metric the columns teacher / RSAE-init / RSAE (/ teacher-FT); the best value of each
  metric in a row is bold (lower is better for mse, fvu, delta_ce, kl, ce_spliced; higher for
  loss_recovered and explained_variance; l0, alive, ... are not ranked). A closing line counts
  the cells where the RSAE beats its teacher.
* **Train / evaluate runs**: one row per run with architecture, the overrides that differ
  between runs (shared ones are listed above the table) and the metrics; failed runs are rows
  marked **failed** with their error.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

from rsae.report.collect import COUNT_KEYS, STAGES, Run

# Table columns in order (those present in at least one run are shown).
METRIC_ORDER = ("mse", "fvu", "explained_variance", "l0", "alive", "dense", "l2_ratio", "ce_spliced", "delta_ce",
                "loss_recovered", "kl", "mmcs", "recovered")
CSV_ORDER = ("mse", "fvu", "explained_variance", "l0", "alive", "dense", "l2_ratio", "ce_clean", "ce_spliced",
             "ce_zero", "delta_ce", "loss_recovered", "kl", "mmcs", "recovered")
LOWER_BETTER = {"mse", "mse_per_dim", "fvu", "delta_ce", "kl", "ce_spliced"}
HIGHER_BETTER = {"loss_recovered", "explained_variance"}
RECONSTRUCTION = ("mse", "fvu", "explained_variance")
DOWNSTREAM = ("ce_spliced", "delta_ce", "loss_recovered", "kl")
UPGRADE_METRICS = ("mse", "fvu", "explained_variance", "l0", "alive", "delta_ce", "loss_recovered", "kl")
LABELS = {"mse": "MSE", "fvu": "FVU", "explained_variance": "expl. var.", "l0": "L0", "alive": "alive",
          "dense": "dense", "l2_ratio": "L2 ratio", "ce_clean": "CE clean", "ce_spliced": "CE spliced",
          "ce_zero": "CE zero", "delta_ce": "ΔCE", "loss_recovered": "loss rec.", "kl": "KL", "mmcs": "MMCS",
          "recovered": "recovered"}
LATEX_LABELS = {**LABELS, "delta_ce": r"$\Delta$CE", "explained_variance": "expl.\\ var."}


def label(key: str, latex: bool = False) -> str:
    """Column label: `probe_f1_k5` -> `probe F1@5`, `probe_raw_f1_k5` -> `raw F1@5`."""
    if key.startswith("probe_") and "_k" in key:
        k = key.rsplit("_k", 1)[1]
        name = f"raw F1@{k}" if key.startswith("probe_raw_") else f"probe F1@{k}"
        return name
    return (LATEX_LABELS if latex else LABELS).get(key, _tex(key) if latex else key)


def fmt(value: float | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def better(metric: str, a: float, b: float) -> bool:
    """Is `a` strictly better than `b` for `metric`?"""
    return a < b if metric in LOWER_BETTER else a > b if metric in HIGHER_BETTER else False


def best_index(metric: str, values: Sequence[float | None]) -> set[int]:
    finite = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if metric not in LOWER_BETTER | HIGHER_BETTER or len(finite) < 2:
        return set()
    target = (min if metric in LOWER_BETTER else max)(v for _, v in finite)
    return {i for i, v in finite if v == target}


def metric_columns(runs: Sequence[Run]) -> list[str]:
    present = {k for r in runs for k in r.metrics}
    cols = [k for k in METRIC_ORDER if k in present]
    return cols + sorted((k for k in present if k.startswith("probe_")),
                         key=lambda k: (k.startswith("probe_raw"), len(k), k))


def split_overrides(runs: Sequence[Run]) -> tuple[list[str], dict[int, list[str]]]:
    """(overrides shared by every run, per-run overrides that differ)."""
    if not runs:
        return [], {}
    sets = [set(r.overrides) for r in runs]
    shared = set.intersection(*sets) if len(runs) > 1 else set()
    shared_list = [o for o in runs[0].overrides if o in shared]
    return shared_list, {i: [o for o in r.overrides if o not in shared] for i, r in enumerate(runs)}


# ---- runs table ------------------------------------------------------------------------------
def runs_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, formatted rows and the overrides shared by all runs."""
    shared, own = split_overrides(runs)
    cols = metric_columns(runs)
    several_models = len({r.info.get("model") for r in runs}) > 1
    header = ["run", "kind", "architecture", "overrides", "status", *cols]
    rows = []
    for i, r in enumerate(runs):
        status = r.status if r.status in ("ok", "interrupted") else "failed"
        over = " ".join(own.get(i, []))
        vals = [r.metrics.get(c) for c in cols]
        if r.status != "ok":
            over = (over + " " if over else "") + f"({r.error})"
        arch = f"{r.architecture} @ {r.info.get('model') or '?'}" if several_models else r.architecture
        rows.append([r.name, r.kind, arch, over, status, *[fmt(v) for v in vals]])
    return header, rows, shared


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_runs(runs: Sequence[Run]) -> str:
    header, rows, shared = runs_rows(runs)
    lines = []
    if shared:
        lines.append("Shared overrides: `" + " ".join(shared) + "`\n")
    lines.append("| " + " | ".join(label(h) for h in header) + " |")
    lines.append("|" + "|".join("---" if i < 5 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        cells = [_md_escape(c) for c in row]
        if row[4] == "failed":
            cells[4] = "**failed**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- upgrade table ---------------------------------------------------------------------------
def upgrade_layout(runs: Sequence[Run]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(stages present, [(metric, stages)] groups) for the upgrade runs."""
    stages = [s for s in STAGES if any(s in r.stages for r in runs)]
    stages += sorted({s for r in runs for s in r.stages} - set(stages))
    metrics = [m for m in UPGRADE_METRICS if any(m in v for r in runs for v in r.stages.values())]
    return stages, [(m, [s for s in stages if any(m in r.stages.get(s, {}) for r in runs)]) for m in metrics]


def upgrade_label(run: Run) -> str:
    model = run.info.get("model") or "?"
    teacher = run.info.get("teacher") or "?"
    return f"{model} / {teacher}"


def upgrade_cells(run: Run, groups: list[tuple[str, list[str]]]) -> list[tuple[str, float | None, bool]]:
    """(metric, value, is_best) for every cell of a row."""
    cells = []
    for metric, stages in groups:
        values = [run.stages.get(s, {}).get(metric) for s in stages]
        best = best_index(metric, values)
        cells += [(metric, v, i in best) for i, v in enumerate(values)]
    return cells


def wins(runs: Sequence[Run]) -> dict[str, tuple[int, int]]:
    """Cells where the RSAE beats its teacher: {'reconstruction': (wins, cells), 'downstream': ...}."""
    out = {}
    for name, metrics in (("reconstruction", RECONSTRUCTION), ("downstream", DOWNSTREAM)):
        won = total = 0
        for r in runs:
            t, s = r.stages.get("teacher", {}), r.stages.get("rsae", {})
            for m in metrics:
                if m in t and m in s and math.isfinite(t[m]) and math.isfinite(s[m]):
                    total += 1
                    won += better(m, s[m], t[m])
        out[name] = (won, total)
    return out


def _upgrade_extra_columns(runs: Sequence[Run]) -> list[str]:
    return [k for k in ("gate", "l0_counting") if any(r.info.get(k) for r in runs)]


def markdown_upgrade(runs: Sequence[Run]) -> str:
    stages, groups = upgrade_layout(runs)
    extra = _upgrade_extra_columns(runs)
    header = ["model / teacher", *extra, "status"]
    header += [f"{LABELS.get(m, m)} {STAGES.get(s, s)}" for m, ss in groups for s in ss]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < len(extra) + 2 else "---:" for i in range(len(header))) + "|"]
    for r in runs:
        cells = [upgrade_label(r), *[r.info.get(k, "") for k in extra], "ok" if r.status == "ok" else "**failed**"]
        for _, v, best in upgrade_cells(r, groups):
            cells.append(f"**{fmt(v)}**" if best else fmt(v))
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    w = wins(runs)
    notes = [f"{a}/{b} {name}" for name, (a, b) in w.items() if b]
    failed = [f"{r.name}: {r.error}" for r in runs if r.status != "ok"]
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\nRSAE beats the teacher in " + " and ".join(notes) + " cells.\n"
    if failed:
        text += "\nFailed: " + "; ".join(failed) + "\n"
    return text


# ---- LaTeX ------------------------------------------------------------------------------------
def _tex(text: str) -> str:
    out = str(text)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")):
        out = out.replace(a, b)
    return out.replace("Δ", r"$\Delta$")


def latex_runs(runs: Sequence[Run]) -> str:
    header, rows, shared = runs_rows(runs)
    ncols = len(header)
    lines = [r"% shared overrides: " + " ".join(shared) if shared else "% runs table",
             r"\begin{tabular}{" + "l" * 5 + "r" * (ncols - 5) + "}", r"\toprule",
             " & ".join(label(h, latex=True) for h in header) + r" \\", r"\midrule"]
    for row in rows:
        cells = [_tex(c) for c in row]
        if row[4] == "failed":
            cells[4] = r"\textbf{failed}"
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def latex_upgrade(runs: Sequence[Run]) -> str:
    stages, groups = upgrade_layout(runs)
    extra = _upgrade_extra_columns(runs)
    lead = 1 + len(extra)
    spec = "l" * lead + "".join("|" + "r" * len(ss) for _, ss in groups)
    top = ["" for _ in range(lead)] + [rf"\multicolumn{{{len(ss)}}}{{c}}{{{LATEX_LABELS.get(m, _tex(m))}}}" for m, ss in groups]
    rules = []
    col = lead + 1
    for _, ss in groups:
        rules.append(rf"\cmidrule(lr){{{col}-{col + len(ss) - 1}}}")
        col += len(ss)
    sub = ["model / teacher", *extra] + [_tex(STAGES.get(s, s)) for _, ss in groups for s in ss]
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule", " & ".join(top) + r" \\", " ".join(rules),
             " & ".join(sub) + r" \\", r"\midrule"]
    for r in runs:
        cells = [_tex(upgrade_label(r)), *[_tex(r.info.get(k, "")) for k in extra]]
        if r.status != "ok":
            cells[0] += r" (\textbf{failed})"
        for _, v, best in upgrade_cells(r, groups):
            cells.append(rf"\textbf{{{fmt(v)}}}" if best else fmt(v))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


# ---- CSV ---------------------------------------------------------------------------------------
def write_csv(path: Path, runs: Sequence[Run]) -> None:
    """One line per run (upgrade runs: one line per stage); every numeric key is a column."""
    records = []
    for r in runs:
        base = {"run": r.name, "kind": r.kind, "architecture": r.architecture, "stage": "",
                "overrides": " ".join(r.overrides), "status": r.status, "error": r.error or ""}
        if r.kind == "upgrade" and r.stages:
            base["architecture"] = upgrade_label(r)
            records += [{**base, "stage": stage, **values} for stage, values in r.stages.items()]
        else:
            records.append({**base, **r.metrics})
    fixed = ["run", "kind", "architecture", "stage", "overrides", "status", "error"]
    keys = {k for rec in records for k in rec} - set(fixed)
    metrics = [k for k in CSV_ORDER if k in keys]
    metrics += sorted(k for k in keys if k not in metrics and k not in COUNT_KEYS) + sorted(keys & COUNT_KEYS)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fixed + metrics, restval="")
        writer.writeheader()
        writer.writerows(records)
