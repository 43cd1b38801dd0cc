"""DDP scaling of `train.py` on cached activations: the same tokens on 1 GPU and on N GPUs.

    python -m rsae.bench ddp --d 2304 --m 65536 --batch 4096 --steps 300 --gpus 2 --json out.json

Writes a synthetic activation cache in rsae's format (no LM needed), then runs
`train.py trainer=ddp trainer.devices=gpus` for `steps` steps at `batch` rows per rank, and
`train.py trainer=gpu` for the same `steps` at `gpus * batch` rows: the same tokens, the same
number of optimizer steps and the same effective batch, so the two runs compute the same
gradient mean and their metrics must agree within noise (data order aside). Reports tokens/s
(timed by `StepTimer` on rank 0, times the number of ranks), the scaling factor (the 1-GPU run
does the same work per step as all ranks together), the final validation metrics of both, and
which rows each rank read first (they must differ).
With `--weak` the 1-GPU run takes `batch` rows per step instead (weak scaling: the same work
per GPU; the usual data-parallel throughput comparison, without the metric check).
The cache is small enough that the DDP run passes the end of the data (an epoch boundary) and
must not hang there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

from rsae.bench._synthetic import data_overrides, write_synthetic_cache
from rsae.bench.e2e import repo_root


class FirstBatchProbe(L.Callback):
    """Each rank writes a fingerprint of its first training batch (proves ranks read different rows),
    and, after that batch's step, how the step ran (SIGTERM check, encoder/decoder graph split)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.fp: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.fp is None:
            self.fp = {"rank": trainer.global_rank, "world": trainer.world_size, "sum": float(batch.float().sum()),
                       "first_row_norm": float(batch[0].float().norm())}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.fp is None or "sigterm_check" in self.fp:
            return
        check = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_broadcast_sigterm_tensor", None)
        self.fp["sigterm_check"] = type(check).__name__
        self.fp["graph_break_before_decode"] = bool(getattr(pl_module.sae, "graph_break_before_decode", False))
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.fp))


def run(name: str, overrides: list[str], work: Path, timeout: int, profile_steps: int = 0) -> dict:
    run_dir = work / name
    cmd = [sys.executable, str(repo_root() / "train.py"), *overrides,
           "+callbacks.step_timer._target_=rsae.bench._step_timer.StepTimer", f"+callbacks.step_timer.out={run_dir / 'timer.json'}",
           f"+callbacks.step_timer.profile_steps={profile_steps}",
           "+callbacks.probe._target_=rsae.bench.ddp.FirstBatchProbe", f"+callbacks.probe.out={run_dir / 'probe'}",
           f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=timeout)
    res: dict = {"name": name, "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
                 "command": "python train.py " + " ".join(overrides)}
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        res["error"] = (proc.stderr or proc.stdout)[-3000:]
        return res
    res["timer"] = json.loads((run_dir / "timer.json").read_text()) if (run_dir / "timer.json").is_file() else None
    res["metrics"] = json.loads((run_dir / "metrics.json").read_text())
    res["probes"] = [json.loads(p.read_text()) for p in sorted((run_dir / "probe").glob("rank*.json"))]
    prof = run_dir / "timer_profile.txt"
    if prof.is_file():  # rank 0's host and GPU time by operation over a few steps before the timed window
        res["profile_text"] = prof.read_text()
    traces = sorted(run_dir.glob("timer_trace_rank*.json.gz"))
    if traces:  # every rank's timeline, with how long the ranks' NCCL kernels waited for each other
        from rsae.bench.timeline import report

        res["timeline"] = report([str(t) for t in traces], profile_steps)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rsae.bench ddp", description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--m", type=int, default=65536)
    p.add_argument("--batch", type=int, default=4096, help="rows per rank per step")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of both runs")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--arch", default="relu")
    p.add_argument("--rows", type=int, default=1 << 20, help="training rows in the synthetic cache")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--work-dir", default="/tmp/rsae-ddp")
    p.add_argument("--json", default=None)
    p.add_argument("--cpu", action="store_true", help="tiny CPU smoke run with gloo")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for both runs (e.g. module.compile=true)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="torch.profiler over this many steps before the timed window: rank 0's op table, every "
                        "rank's chrome trace, and their timeline (python -m rsae.bench timeline)")
    p.add_argument("--weak", action="store_true",
                   help="weak scaling: the 1-GPU run takes `batch` rows per step (the per-rank batch), not gpus x batch; "
                        "tokens/s compare, the metrics do not (the DDP run sees gpus x the tokens)")
    p.add_argument("--skip-single", action="store_true",
                   help="run only the DDP side (e.g. a second DDP variant against a one-GPU run already measured)")
    p.add_argument("--ddp-overrides", nargs="*", default=[],
                   help="overrides for the DDP run only (e.g. trainer.strategy.grad_compression=bf16)")
    a = p.parse_args(argv)
    work = Path(a.work_dir)
    device = torch.device("cpu" if a.cpu else "cuda")
    cache = work / f"cache-d{a.d}"
    data = data_overrides(write_synthetic_cache(cache, a.d, a.rows, 16 * a.batch, device))
    common = [f"sae={a.arch}", "data=activations", *data, f"data.num_workers={a.workers}",
              "sae.expansion_factor=null", f"sae.d_sae={a.m}", "logger=csv", "trainer.enable_progress_bar=false",
              "~callbacks.downstream_eval", "~callbacks.model_checkpoint", "trainer.limit_val_batches=8", *a.overrides]
    hw = ["trainer.accelerator=cpu", "trainer.precision=32-true"] if a.cpu else ["trainer.precision=bf16-mixed"]
    skip = f"+callbacks.step_timer.skip={min(50, a.steps // 4)}"
    results = {
        "args": vars(a),
        "single": {"name": "single", "error": "skipped (--skip-single)"} if a.skip_single else run("single", [*common, f"data.batch_size={a.batch * (1 if a.weak else a.gpus)}", "trainer=gpu" if not a.cpu else "trainer=cpu",
                                 *hw, f"trainer.max_steps={a.steps}", f"trainer.val_check_interval={a.steps}", skip],
                      work, a.timeout, a.profile_steps),
        "ddp": run("ddp", [*common, f"data.batch_size={a.batch}", "trainer=ddp", f"trainer.devices={a.gpus}", *hw,
                           f"trainer.max_steps={a.steps}",
                           f"trainer.val_check_interval={a.steps}", skip, *a.ddp_overrides],
                   work, a.timeout, a.profile_steps),
    }
    s, d = results["single"], results["ddp"]
    lines = ["| run | GPUs | steps | rows/step | tokens/s | ms/step | val/mse | val/fvu | val/l0 |", "|---|---|---|---|---|---|---|---|---|"]
    for r, n, steps in ((s, 1, a.steps), (d, a.gpus, a.steps)):
        if "error" in r or not r.get("timer"):
            lines.append(f"| {r['name']} | {n} | {steps} | | failed: {r.get('error', 'no timer')[-200:]!r} | | | | |")
            continue
        tps = r["timer"]["tokens_per_s"] * n
        r["tokens_per_s_total"] = tps
        m = r["metrics"]
        rows = a.batch * (1 if a.weak and n == 1 else a.gpus)
        lines.append(f"| {r['name']} | {n} | {steps} | {rows} | {tps:,.0f} | {r['timer']['ms']:.2f} | "
                     f"{m.get('val/mse', float('nan')):.4g} | {m.get('val/fvu', float('nan')):.4f} | {m.get('val/l0', float('nan')):.2f} |")
    if "tokens_per_s_total" in s and "tokens_per_s_total" in d:
        results["scaling"] = d["tokens_per_s_total"] / s["tokens_per_s_total"]
        kind = "weak scaling (same rows per GPU)" if a.weak else "scaling (same rows per step)"
        lines.append(f"\n{kind} {a.gpus} GPUs / 1 GPU: {results['scaling']:.2f}x")
    if d.get("probes"):
        sums = [pr["sum"] for pr in d["probes"]]
        results["ranks_read_different_rows"] = len(set(sums)) == len(sums) == a.gpus
        lines.append(f"first-batch fingerprints per rank: {sums} (different: {results['ranks_read_different_rows']}); "
                     f"SIGTERM check: {d['probes'][0].get('sigterm_check')}; "
                     f"encoder/decoder graph split: {d['probes'][0].get('graph_break_before_decode')}")
    for r in (s, d):
        if r.get("timeline"):
            lines += ["", f"{r['name']}: {r['timeline']}"]
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0 if ("error" not in s or a.skip_single) and "error" not in d else 1


if __name__ == "__main__":
    raise SystemExit(main())
