"""Reproduce the RSAE paper table on one model: train three teachers (ReLU, JumpReLU, TopK),
upgrade each to an RSAE (with the teacher-fine-tuned control), then tabulate and plot.

    python -m rsae.paper --out runs/paper                      # the embedded model, default data
    python -m rsae.paper --out runs/paper --steps 3000 -- trainer=gpu data.n_tokens=2000000

Every step is a `train.py` run in its own process and directory; a step whose outputs exist is
skipped, so an interrupted reproduction resumes where it stopped. Overrides after `--` go to
every run (data, LM, trainer); `--teacher-overrides` only to the teacher runs and
`--upgrade-overrides` only to the upgrades (e.g. `sae.sharing=latent upgrade.hold_l0=false`). `--teachers
relu,jumprelu,topk,batchtopk,matryoshka,gated` adds BatchTopK, Matryoshka BatchTopK (both upgraded
with the BatchTopK inference threshold as a JumpReLU mask) and Gated teachers.

Presets (`--preset`) fix the scale; arguments given after them add to them:

* `cpu-small`: SmolLM2 layer 6, 200k tokens of the embedded plays, 1152 latents, 1000 steps, no
  downstream pass in the upgrades: the CPU table of docs/rational.md.
* `gpu-scale`: SmolLM2 layer 15 (of 30), 16384 latents, 20M tokens of `--text`, batch 4096, 5000
  steps (about 1.15 passes over the 18M training tokens), compiled steps with CUDA graphs, and each
  family at three sparsities (TopK, BatchTopK and Matryoshka k = 16, 32, 64; JumpReLU target L0
  16, 32, 64; ReLU three L1 coefficients). Needs `--text` (a parquet / jsonl / txt corpus) and a GPU.

`--ablations degrees_3_2,gate_frozen,...` also upgrades each row's teacher once per named ablation
(`ABLATIONS` below: one setting of the upgrade changed; no control but for `finetune_x2` and
`control_batchtopk`) into `<out>/ablations/<row>/<name>`, and tabulates them against the row's RSAE
and control in `report/ablations.md`. A teacher trained again (its weights were left behind) takes
its row's upgrade and ablations with it (the old results move to `<out>/stale/`), so that they all
share one teacher. `control_batchtopk` is skipped on rows that are not Matryoshka. The default
degrees are (5, 4) for ReLU teachers and (9, 8) for the others, so that family's `degrees_*`
ablation repeats its RSAE.

`--parallel N` runs N rows (a teacher, then its upgrade) at once: on a GPU where one small SAE's
steps leave it idle part of the time. `--dry-run` prints the commands without running them.
`--pack results.tar.gz` also writes every run's results without weights or checkpoints (a few MB):
unpacked into `--out` on another machine, a rerun there reports them and redoes only the rows
that are missing (a teacher whose weights were left behind is trained again when its upgrade
still has to run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rsae.io.saelens import WEIGHTS_FILE

ROOT = Path(__file__).resolve().parents[2]
TEACHERS = {
    "relu": ["sae=relu"],
    "jumprelu": ["sae=jumprelu"],
    "topk": ["sae=topk"],
    "batchtopk": ["sae=batchtopk"],
    "matryoshka": ["sae=matryoshka"],
    "gated": ["sae=gated"],
}
# One teacher per sparsity level (name -> overrides) for the presets that sweep the L0 range.
L0_LEVELS = {
    **{f"topk_k{k}": ["sae=topk", f"sae.k={k}"] for k in (16, 32, 64)},
    **{f"batchtopk_k{k}": ["sae=batchtopk", f"sae.k={k}"] for k in (16, 32, 64)},
    **{f"matryoshka_k{k}": ["sae=matryoshka", f"sae.k={k}"] for k in (16, 32, 64)},
    **{f"jumprelu_l0_{n}": ["sae=jumprelu", f"sae.l0_target={n}"] for n in (16, 32, 64)},
    **{f"relu_l1_{c}": ["sae=relu", f"sae.l1_coefficient={c}"] for c in (2, 5, 12)},
}
# The upgrade's open points (`--ablations`): name -> the upgrade's overrides. Each runs without a
# control (the row's is the reference) except those in WITH_CONTROL: `finetune_x2`, whose control
# fine-tunes as long, and `control_batchtopk`, a Matryoshka row's control without the nested loss.
ABLATIONS: dict[str, list[str]] = {
    "degrees_3_2": ["sae.degrees=[3,2]"],
    "degrees_5_4": ["sae.degrees=[5,4]"],
    "degrees_9_8": ["sae.degrees=[9,8]"],
    "denominator_A": ["sae.denominator=A"],
    "sharing_group16": ["sae.sharing=group", "sae.n_groups=16"],
    "sharing_latent": ["sae.sharing=latent"],
    "gate_frozen": ["upgrade.gate_lr_scale=0"],
    "gate_lr_x0.1": ["upgrade.gate_lr_scale=0.1"],
    "gate_lr_x10": ["upgrade.gate_lr_scale=10"],
    "scales_only": ["+module.lr_scales={rational_gate.a:0,rational_gate.b:0}"],  # only C_in, C_out learn
    "shape_only": ["+module.lr_scales={rational_gate.log_c_in:0,rational_gate.log_c_out:0}"],
    "finetune_x2": [],  # upgrade.steps = twice the teacher's, set in main()
    "control_batchtopk": ["upgrade.control_architecture=batchtopk"],
}
WITH_CONTROL = {"finetune_x2", "control_batchtopk"}
MATRYOSHKA_ONLY = {"control_batchtopk"}
PRESETS: dict[str, dict] = {
    "cpu-small": {
        "steps": 1000, "teachers": "relu,jumprelu,topk",
        "overrides": ["lm.layer=6", "data.n_tokens=200000", "data.batch_size=1024", "sae.expansion_factor=2"],
        "upgrade_overrides": ["upgrade.downstream=false", "upgrade.calibration_tokens=16384"],
    },
    "gpu-scale": {
        "steps": 5000, "teachers": ",".join(L0_LEVELS), "needs_text": True,
        "overrides": ["trainer=gpu", "lm.layer=15", "data.n_tokens=20000000", "data.batch_size=4096",
                      "data.shuffle_device=cuda", "module.compile=true", "module.cuda_graph=true"],
        "teacher_overrides": ["sae.expansion_factor=null", "sae.d_sae=16384"],
        "upgrade_overrides": [],
    },
}


_say_lock = threading.Lock()


def say(line: str) -> None:
    """One whole line to stdout: rows running at once (`--parallel`) would interleave a print's
    text and its newline."""
    with _say_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def run(args: list[str], log: Path) -> bool:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    say(f"$ python train.py {' '.join(args)}")
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], stdout=out, stderr=subprocess.STDOUT).returncode
    say(f"  -> exit {rc} in {time.time() - start:.0f} s (log: {log})")
    if rc != 0:
        say(f"  failed; see {log}")
    return rc == 0


def pack(root: Path, dest: Path) -> Path:
    """`root`'s files but weights and checkpoints, as one .tar.gz (a few MB for a whole table)."""
    heavy = (".safetensors", ".ckpt", ".pt", ".pth")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        for f in sorted(root.rglob("*")):
            if f.is_file() and not f.name.endswith(heavy) and "checkpoints" not in f.relative_to(root).parts:
                tar.add(f, arcname=str(f.relative_to(root)))
    return dest


def done(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rsae.paper", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/paper"))
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a scale (see above)")
    p.add_argument("--text", default=None, help="text files for every run (data.text_files), e.g. a corpus parquet")
    p.add_argument("--steps", type=int, default=None, help="teacher training steps (the fine-tunes use as many; default 1500)")
    p.add_argument("--teachers", default=None, help=f"comma list of {sorted(TEACHERS) + sorted(L0_LEVELS)}")
    p.add_argument("--teacher-overrides", nargs="*", default=[], help="extra overrides for the teacher runs only")
    p.add_argument("--upgrade-overrides", nargs="*", default=[], help="extra overrides for the upgrade runs only")
    p.add_argument("--ablations", default="", help=f"comma list of upgrade ablations run on every row: {sorted(ABLATIONS)}")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--parallel", type=int, default=1,
                   help="rows (teacher + upgrade) run at once, e.g. 3 on a GPU whose SAE steps leave it idle part of the time")
    p.add_argument("--pack", type=Path, default=None,
                   help="also write the results without weights or checkpoints (json, yaml, csv, logs, report) to this "
                        ".tar.gz: unpacked into --out elsewhere, a rerun there reports them and redoes only what is missing")
    p.add_argument("overrides", nargs="*", help="overrides for every run (after --)")
    a = p.parse_args(argv)
    preset = PRESETS.get(a.preset, {})
    if preset.get("needs_text") and not a.text:
        p.error(f"--preset {a.preset} needs --text <corpus> (the embedded plays hold too few tokens)")
    steps = a.steps or preset.get("steps", 1500)
    names = (a.teachers or preset.get("teachers", "relu,jumprelu,topk")).split(",")
    unknown = [n for n in names if n not in TEACHERS and n not in L0_LEVELS]
    if unknown:
        p.error(f"unknown teacher {unknown[0]!r}; choose from {sorted(TEACHERS) + sorted(L0_LEVELS)}")
    ablations = list(dict.fromkeys(n for n in a.ablations.split(",") if n))
    unknown = [n for n in ablations if n not in ABLATIONS]
    if unknown:
        p.error(f"unknown ablation {unknown[0]!r}; choose from {sorted(ABLATIONS)}")
    if a.parallel < 1:
        p.error(f"--parallel must be at least 1, got {a.parallel}")
    quoted = str(Path(a.text).resolve()).replace("\\", "\\\\").replace("'", "\\'") if a.text else ""
    text = [f"data.text_files=['{quoted}']"] if a.text else []  # quoted: a path may hold , = [ or spaces
    every = [*preset.get("overrides", []), *text, *a.overrides]
    teacher_extra = [*preset.get("teacher_overrides", []), *a.teacher_overrides]
    upgrade_extra = [*preset.get("upgrade_overrides", []), *a.upgrade_overrides]
    out = a.out.resolve()
    start = time.time()

    def ablation_overrides(name: str) -> list[str]:
        extra = [f"upgrade.steps={2 * steps}"] if name == "finetune_x2" else ABLATIONS[name]
        return [*extra, f"upgrade.control={str(name in WITH_CONTROL).lower()}"]

    def ablation(name: str, which: str) -> bool:
        """One more upgrade of row `name`'s teacher with ablation `which`, skipped when done."""
        adir = out / "ablations" / name / which
        args = ["sae=rational", f"teacher.path={out / 'teachers' / name / 'sae'}", *upgrade_extra, *every,
                *ablation_overrides(which), "logger=csv", f"hydra.run.dir={adir}"]  # last: the ablation's own win
        if a.dry_run:
            print("python train.py " + " ".join(args))
            return True
        return done(adir / "metrics.json") or run(args, adir / "run.log")

    later = []  # the ablations' futures: queued once their row's teacher exists

    def row(name: str) -> bool:
        """One teacher and its upgrade, each skipped when its results exist."""
        tdir, udir = out / "teachers" / name, out / "upgrades" / name
        teacher = [*TEACHERS.get(name, L0_LEVELS.get(name)), f"trainer.max_steps={steps}", *teacher_extra, *every,
                   "logger=csv", f"hydra.run.dir={tdir}"]
        upgrade = ["sae=rational", f"teacher.path={tdir / 'sae'}", *upgrade_extra, *every, "logger=csv",
                   f"hydra.run.dir={udir}"]
        if a.dry_run:
            print("python train.py " + " ".join(teacher) + "\npython train.py " + " ".join(upgrade))
            return all([ablation(name, which) for which in ablations])
        adirs = [out / "ablations" / name / which for which in ablations]
        if done(udir / "metrics.json") and all(done(d / "metrics.json") for d in adirs):
            return True
        ok = True
        if not (done(tdir / "metrics.json") and (tdir / "sae" / WEIGHTS_FILE).is_file()):  # (a packed result has no weights)
            aside = out / "stale" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
            for stale in (tdir, udir, out / "ablations" / name):  # a teacher without weights, and what came from it
                if stale.exists():
                    say(f"  moving {stale} to {aside}: the teacher is trained again")
                    aside.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(stale), str(aside / f"{stale.parent.name}-{stale.name}"))
            ok = run(teacher, tdir / "run.log")
        if done(tdir / "metrics.json"):
            for which in ablations:
                if which in MATRYOSHKA_ONLY and "sae=matryoshka" not in (TEACHERS.get(name) or L0_LEVELS[name]):
                    say(f"  {which} skipped for {name}: it applies to Matryoshka rows only")
                    continue
                later.append(pool.submit(ablation, name, which))
            ok &= done(udir / "metrics.json") or run(upgrade, udir / "run.log")
        return ok

    # Rows are independent processes; several at once share the GPU (the activation cache is built
    # once: the other runs wait on its lock, then read it).
    with ThreadPoolExecutor(max_workers=1 if a.dry_run else a.parallel) as pool:
        ok = all(list(pool.map(row, names)))
        ok &= all([f.result() for f in later])  # every row has queued its ablations by now
    if a.dry_run:
        return 0
    from rsae.report.__main__ import main as report
    from rsae.report.ablations import write_ablations

    report([str(out / "upgrades"), "--out", str(out / "report")])
    shown = {n: [o for o in ablation_overrides(n) if not o.startswith("upgrade.control=")] for n in ABLATIONS}
    table = write_ablations(out, shown, out / "report" / "ablations.md")
    if table:
        print(f"ablations: {table}")
    print(f"done in {time.time() - start:.0f} s; table: {out / 'report' / 'table.md'}")
    if a.pack:
        print(f"results without weights: {pack(out, a.pack)}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
