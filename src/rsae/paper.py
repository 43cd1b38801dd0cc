"""Reproduce the RSAE paper table on one model: train three teachers (ReLU, JumpReLU, TopK),
upgrade each to an RSAE (with the teacher-fine-tuned control), then tabulate and plot.

    python -m rsae.paper --out runs/paper                      # the embedded model, default data
    python -m rsae.paper --out runs/paper --steps 3000 -- trainer=gpu data.n_tokens=2000000

Every step is a `train.py` run in its own process and directory; a step whose outputs exist is
skipped, so an interrupted reproduction resumes where it stopped. Overrides after `--` go to
every run (data, LM, trainer); `--teacher-overrides` only to the teacher runs and
`--upgrade-overrides` only to the upgrades (e.g. `upgrade.sharing=latent`). `--teachers
relu,jumprelu,topk,matryoshka` adds a Matryoshka BatchTopK teacher (upgraded as a BatchTopK one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEACHERS = {
    "relu": ["sae=relu"],
    "jumprelu": ["sae=jumprelu"],
    "topk": ["sae=topk"],
    "matryoshka": ["sae=matryoshka"],
}


def run(args: list[str], log: Path) -> bool:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(f"$ python train.py {' '.join(args)}", flush=True)
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], stdout=out, stderr=subprocess.STDOUT).returncode
    print(f"  -> exit {rc} in {time.time() - start:.0f} s (log: {log})", flush=True)
    if rc != 0:
        print(f"  failed; see {log}", flush=True)
    return rc == 0


def done(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rsae.paper", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/paper"))
    p.add_argument("--steps", type=int, default=1500, help="teacher training steps (the fine-tunes use as many)")
    p.add_argument("--teachers", default="relu,jumprelu,topk")
    p.add_argument("--teacher-overrides", nargs="*", default=[], help="extra overrides for the teacher runs only")
    p.add_argument("--upgrade-overrides", nargs="*", default=[], help="extra overrides for the upgrade runs only")
    p.add_argument("overrides", nargs="*", help="overrides for every run (after --)")
    a = p.parse_args(argv)
    out = a.out.resolve()
    start = time.time()
    ok = True
    for name in a.teachers.split(","):
        tdir, udir = out / "teachers" / name, out / "upgrades" / name
        if not done(tdir / "metrics.json"):
            ok &= run([*TEACHERS[name], f"trainer.max_steps={a.steps}", *a.teacher_overrides, *a.overrides,
                       "logger=csv", f"hydra.run.dir={tdir}"], tdir / "run.log")
        if done(tdir / "metrics.json") and not done(udir / "metrics.json"):
            ok &= run(["experiment=rsae_upgrade", f"teacher.path={tdir / 'sae'}", *a.upgrade_overrides, *a.overrides,
                       "logger=csv", f"hydra.run.dir={udir}"], udir / "run.log")
    from rsae.report.__main__ import main as report

    report([str(out / "upgrades"), "--out", str(out / "report")])
    print(f"done in {time.time() - start:.0f} s; table: {out / 'report' / 'table.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
