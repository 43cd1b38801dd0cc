"""Hydra launcher that runs every multirun trial in its own Python process.

One process per trial isolates trials from each other: a crash, a leaked GPU allocation or an
unfinished W&B run in one trial cannot affect the next. Each trial is the same script started
with the trial's overrides and `hydra.run.dir` set to its sweep subdirectory; its return value
(the optimized metric) is read back from the `metrics.json` it writes, so sweepers such as
Optuna see it. A failed trial returns NaN and the sweep goes on.
"""

import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class SubprocessLauncherConf:
    _target_: str = "hydra_plugins.rsae_launcher.subprocess_launcher.SubprocessLauncher"
    # Extra environment variables for every trial (e.g. CUDA_VISIBLE_DEVICES).
    env: Dict[str, str] = field(default_factory=dict)
    timeout_s: Optional[int] = None


ConfigStore.instance().store(group="hydra/launcher", name="subprocess", node=SubprocessLauncherConf, provider="rsae")


class SubprocessLauncher(Launcher):
    def __init__(self, env: Optional[Dict[str, str]] = None, timeout_s: Optional[int] = None) -> None:
        self.env = dict(env or {})
        self.timeout_s = timeout_s
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        script = os.path.abspath(sys.argv[0])
        returns = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            run_dir = sweep_dir / str(sweep_config.hydra.sweep.subdir)
            log.info("trial #%d: %s", idx, " ".join(filter_overrides(overrides)))
            returns.append(self._run_trial(script, list(overrides), run_dir, idx, sweep_config))
        return returns

    def _run_trial(self, script: str, overrides: list[str], run_dir: Path, idx: int, cfg: DictConfig) -> JobReturn:
        # hydra.mode=RUN: a preset that sets MULTIRUN (e.g. hparams_search) must not sweep again inside a trial.
        cmd = [sys.executable, script, *overrides, "hydra.mode=RUN", f"hydra.run.dir={run_dir}", f"hydra.job.num={idx}"]
        env = {**os.environ, **self.env, "RSAE_SWEEP_DIR": str(run_dir.parent), "RSAE_TRIAL": str(idx)}
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "trial.out", "w") as out:
            try:
                rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=self.timeout_s).returncode
            except subprocess.TimeoutExpired:
                rc = -1
                _record_failure(run_dir, f"trial exceeded timeout_s={self.timeout_s}")
        value = _read_metric(run_dir, str(OmegaConf.select(cfg, "optimized_metric", default="")))
        if rc != 0:
            _record_failure(run_dir, f"trial process exited with code {rc}; see trial.out")
            log.error("trial #%d failed (exit code %d): %s", idx, rc, run_dir / "trial.out")
        ret = JobReturn(overrides=overrides, cfg=cfg, hydra_cfg=None, working_dir=str(run_dir))
        ret.status = JobStatus.COMPLETED
        ret.return_value = value if rc == 0 else float("nan")
        ret.task_name = str(OmegaConf.select(cfg, "hydra.job.name", default="train"))
        return ret


def _read_metric(run_dir: Path, key: str) -> Any:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return float("nan")
    value = metrics.get(key)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else float("nan")


def _record_failure(run_dir: Path, error: str) -> None:
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
        if metrics.get("status") == "failed":
            return  # the trial recorded its own, more precise error
    except (OSError, ValueError):
        pass
    path.write_text(json.dumps({"status": "failed", "error": error}, indent=2))
