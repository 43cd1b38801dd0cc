"""End to end: `train.py data=activations` on a synthetic activation cache, timed by the StepTimer
callback over the steps after the first --e2e-skip (data loading, Lightning and logging included).

    python -m rsae.bench e2e --e2e relu,topk --e2e-shapes 768x24576 --e2e-workers 2

The options are those of `python -m rsae.bench train` (whose --help describes the measurements);
this runs its end-to-end runs only (their ratio to the raw step needs `train`, which runs both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def repo_root() -> Path:
    import rsae

    return Path(rsae.__file__).resolve().parents[2]


def run_e2e(arch, d, m, batch, args, device, data_args: list[str], work: Path, workers: int,
            cuda_graph: bool = False) -> dict:
    run_dir = work / f"e2e-{arch}-{d}x{m}-b{batch}-w{workers}{'-graph' if cuda_graph else ''}"
    timer = run_dir / "timer.json"
    cpu = device.type != "cuda"
    overrides = [
        f"sae={arch}", "data=activations", *data_args, f"data.batch_size={batch}",
        f"data.num_workers={workers}", "sae.expansion_factor=null", f"sae.d_sae={m}",
        f"trainer={'cpu' if cpu else 'gpu'}", f"trainer.max_steps={args.e2e_steps}",
        f"trainer.val_check_interval={args.e2e_steps + 1}", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "logger=none", f"module.compile={args.e2e_compile if not cpu else 'false'}",
        "~callbacks.downstream_eval", "~callbacks.model_checkpoint",
        "+callbacks.step_timer._target_=rsae.bench._step_timer.StepTimer", f"+callbacks.step_timer.out={timer}",
        f"+callbacks.step_timer.skip={min(args.e2e_skip, max(0, args.e2e_steps - 2))}",
        f"+callbacks.step_timer.profile_steps={args.e2e_profile_steps if args.e2e_skip >= args.e2e_profile_steps + 8 else 0}",
        f"+callbacks.step_timer.sync_steps={args.e2e_sync_steps if args.e2e_skip >= args.e2e_sync_steps + 2 else 0}",
        f"hydra.run.dir={run_dir}", f"seed={args.seed}", f"module.cuda_graph={str(cuda_graph).lower()}",
        *args.e2e_overrides.split(),
    ]
    if arch in ("topk", "batchtopk", "matryoshka"):
        overrides.append(f"sae.k={args.k}")
    if cpu:
        overrides.append("trainer.precision=32-true")
    cmd = [sys.executable, str(repo_root() / "train.py"), *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=args.e2e_timeout)
    variant = "compiled" if args.e2e_compile == "true" and not cpu else "fast"
    if cuda_graph:
        variant += "+graph"  # compared with the raw step of the same variant
    res = {"kind": "e2e", "arch": arch, "variant": variant,
           "d": d, "m": m, "batch": batch, "wall_s": round(time.perf_counter() - t0, 1), "returncode": proc.returncode,
           "num_workers": workers, "command": "python train.py " + " ".join(overrides)}
    if proc.returncode != 0 or not timer.is_file():
        res["error"] = (proc.stderr or proc.stdout)[-2000:]
        return res
    res.update(json.loads(timer.read_text()))
    prof = timer.with_name(timer.stem + "_profile.txt")
    if prof.is_file():
        res["profile_text"] = prof.read_text()
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        m_ = json.loads(metrics.read_text())
        res["final"] = {k: m_[k] for k in ("val/mse", "val/fvu", "val/l0") if k in m_}
    return res
