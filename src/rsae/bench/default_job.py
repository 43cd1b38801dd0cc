"""Wall time of the default job, `python train.py` with no overrides, per stage, from a cold cache.

    python -m rsae.bench default                          # the job a new user runs first
    python -m rsae.bench default -- trainer.max_steps=200 # extra train.py overrides after `--`

Runs `train.py` in a subprocess, as a user would, with an empty activation cache root
(`RSAE_CACHE`, a temporary directory) and its own run directory, and adds one callback,
`StageTimer`, that records when training and each validation start and end. Prints:

* harvest: the cache build (LM load, tokenising, forward passes, shard writes), from the
  cache manifest's `harvest_seconds`;
* training: the training steps, less any validation run during them;
* validation: every validation loop, the spliced-CE pass and its LM load included;
* other: the rest of the process (imports, Hydra, W&B start, export, shutdown);
* total: the subprocess's wall time;

with each stage's share of the total and the machine load (`/proc/loadavg`) before and after,
since a shared machine slows every multi-threaded stage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[3]  # the repository (train.py lives here)


class StageTimer(L.Callback):
    """Appends `{"event": ..., "t": unix time, "step": ...}` lines to `path` as the run goes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _mark(self, event: str, trainer: L.Trainer) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"event": event, "t": time.time(), "step": trainer.global_step}) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        self._mark("train_start", trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._mark("train_end", trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._mark("val_start", trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._mark("val_end", trainer)


def stage_times(events: list[dict], harvest_s: float, total_s: float) -> dict[str, float]:
    """Seconds per stage from the timer's events (see the module docstring)."""
    def spans(start: str, end: str) -> list[tuple[float, float]]:
        starts = [e["t"] for e in events if e["event"] == start]
        ends = [e["t"] for e in events if e["event"] == end]
        return list(zip(starts, ends))

    vals = spans("val_start", "val_end")
    train = spans("train_start", "train_end")
    validation = sum(b - a for a, b in vals)
    training = sum(b - a for a, b in train)
    training -= sum(b - a for a, b in vals for t0, t1 in train if t0 <= a and b <= t1)
    return {"harvest": harvest_s, "training": training, "validation": validation,
            "other": total_s - harvest_s - training - validation, "total": total_s,
            "validations": float(len(vals))}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run(overrides: list[str], workdir: Path, python: str = sys.executable) -> dict:
    """Run the default job (plus `overrides`) from a cold cache under `workdir`; stage times and status."""
    events_file = workdir / "stages.jsonl"
    run_dir, cache = workdir / "run", workdir / "cache"
    cmd = [python, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}",
           f"+callbacks.stage_timer._target_={__name__}.StageTimer", f"+callbacks.stage_timer.path={events_file}",
           *overrides]
    env = {**os.environ, "RSAE_CACHE": str(cache)}
    load_before = loadavg()
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    total = time.perf_counter() - started
    (workdir / "job.log").write_text(proc.stdout)
    manifests = list(cache.rglob("manifest.json"))
    harvest_s = json.loads(manifests[0].read_text())["harvest_seconds"] if manifests else 0.0
    events = [json.loads(line) for line in events_file.read_text().splitlines()] if events_file.is_file() else []
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {"returncode": proc.returncode, "stages": stage_times(events, harvest_s, total),
            "load_before": load_before, "load_after": loadavg(), "metrics": metrics, "log": str(workdir / "job.log"),
            "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": f"{platform.node()} {os.cpu_count()} cpus"}


def report(result: dict) -> str:
    s = result["stages"]
    total = s["total"] or 1.0
    lines = [f"default job, {result['date']}, {result['machine']}, load average before {result['load_before']}, "
             f"after {result['load_after']}", "", "| stage | seconds | share |", "|---|---|---|"]
    for name in ("harvest", "training", "validation", "other", "total"):
        lines.append(f"| {name} | {s[name]:.1f} | {100 * s[name] / total:.0f}% |")
    lines.append(f"\nvalidations run: {int(s['validations'])}")
    m = result["metrics"]
    keys = ("val/fvu", "val/loss_recovered", "val/delta_ce", "val/l0")
    lines.append("metrics: " + ", ".join(f"{k} {m[k]:.4f}" for k in keys if isinstance(m.get(k), float)))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m rsae.bench default", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="keep the cache, run directory and log here (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = p.parse_args(argv)
    if not (ROOT / "train.py").is_file():
        print(f"error: train.py not found in {ROOT}: run from a source checkout (pip install -e .)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rsae-bench-default-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(args.overrides, workdir)
        if result["returncode"] != 0:
            print(Path(result["log"]).read_text()[-4000:], file=sys.stderr)
            print(f"error: the job exited with {result['returncode']}", file=sys.stderr)
            return 1
        print(report(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
