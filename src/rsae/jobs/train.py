"""The training job that `train.py` calls: compose objects from the config, fit, export, report.

This and the other modules in `rsae.jobs` are the only places that call `hydra.utils.instantiate`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rsae.io.saelens import save_sae
from rsae.jobs.common import (CheckpointOnInterrupt, check_checkpoint_fits, finish_loggers, output_dir, read_checkpoint,
                              require_finite, require_finite_metrics, rerun_command, run_guarded,
                              stop_after_step_on_signal, write_json)
from rsae.sae.base import ConfigError, require
from rsae.validate import check_config

log = logging.getLogger(__name__)


def build_sae(cfg: DictConfig, d_in: int):
    declared = cfg.sae.get("d_in")
    if declared is not None and int(declared) != d_in:
        raise ConfigError(f"sae.d_in={declared} does not match the data's d_in={d_in}")
    return instantiate(cfg.sae, d_in=d_in)


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(CheckpointOnInterrupt(run_dir / "checkpoints" / "last.ckpt"))
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if trainer.logger is not None:  # the config as it acted: an upgrade's blocks play no part in training
        logged = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("teacher", "upgrade")}
        trainer.logger.log_hyperparams(logged)
    return trainer


def fit(cfg: DictConfig) -> dict[str, Any]:
    run_dir = output_dir()
    check_config(cfg)  # every setting that does not need the data's d_in, before anything loads
    ckpt_path = cfg.get("ckpt_path")
    ckpt = read_checkpoint(ckpt_path) if ckpt_path is not None else None
    L.seed_everything(cfg.seed, workers=True)
    dm = instantiate(cfg.data)
    if ckpt is not None and callable(getattr(dm, "restore_before_setup", None)):
        dm.restore_before_setup(ckpt.get(type(dm).__qualname__))  # data=live: its mean norm, not estimated again
    if cfg.get("cache_only"):
        dm.prepare_data()
        log.info("cache ready; exiting (cache_only=true)")
        return {}
    dm.prepare_data()
    dm.setup("fit")
    check_config(cfg, d_in=dm.d_in)  # bounds on d_sae, memory: before the SAE is allocated
    sae = build_sae(cfg, dm.d_in)
    module = instantiate(cfg.module, sae=sae, ground_truth=getattr(dm, "ground_truth", None))
    module.set_activation_scale(dm.norm_scale)  # a resumed run restores the checkpoint's value
    if ckpt is not None:
        check_checkpoint_fits(ckpt, module, ckpt_path)
        del ckpt
    trainer = build_trainer(cfg, run_dir)
    try:
        with stop_after_step_on_signal(trainer):
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        module.check_finite()
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        results = trainer.validate(module, datamodule=dm, verbose=False)
        metrics = {k: float(v) for k, v in results[0].items()} if results else {}
        require_finite_metrics(metrics, ("val/mse", "val/fvu"), "final validation")
        metrics["train/steps"] = trainer.global_step
        metrics.update(target_l0_objective(metrics, cfg.get("target_l0"), cfg.get("target_l0_weight", 0.1)))
        if trainer.is_global_zero:
            require_finite(module.sae.state_dict(), "the trained SAE")  # never export a diverged SAE
            save_sae(module.sae, run_dir / "sae", scale=float(module.act_scale), metadata=export_metadata(cfg, dm, trainer.global_step))
            write_json(run_dir / "metrics.json", {"status": "ok", **metrics})
            log.info("final metrics: %s", json.dumps({k: round(v, 5) for k, v in metrics.items() if math.isfinite(v)}))
        return metrics
    finally:
        finish_loggers(trainer)


def resume_command(checkpoint: Path | None) -> str:
    """The command that resumes an interrupted run: its own, from the checkpoint saved on the
    signal, else from the run's last periodic checkpoint (else it starts over)."""
    if checkpoint is None:
        last = output_dir() / "checkpoints" / "last.ckpt"
        checkpoint = last if last.is_file() else None
    return rerun_command(f"ckpt_path={checkpoint.resolve()}") if checkpoint is not None else rerun_command()


def target_l0_objective(metrics: dict[str, float], target_l0: float | None, weight: float) -> dict[str, float]:
    if target_l0 is None or "val/fvu" not in metrics:
        return {}
    require(target_l0 > 0, f"target_l0 must be > 0, got {target_l0}")
    l0 = max(metrics.get("val/l0", 0.0), 1e-6)
    return {"objective/fvu_at_target_l0": metrics["val/fvu"] + weight * abs(math.log(l0 / target_l0))}


def export_metadata(cfg: DictConfig, dm, steps: int) -> dict[str, Any]:
    meta = {"rsae_sae_config": OmegaConf.to_container(cfg.sae, resolve=True), "rsae_train_steps": int(steps)}
    for key in ("model_name", "hook_name", "hook_layer", "context_size"):
        value = getattr(dm, key, None)
        if value is not None:
            meta[key] = value
    return meta


def main(cfg: DictConfig) -> float | None:
    metrics = run_guarded(fit, cfg, resume=resume_command)
    if not metrics:  # cache_only
        return None
    if metrics.get("status") == "failed":
        return float("nan")
    value = metrics.get(cfg.optimized_metric)
    require(value is not None, f"optimized_metric {cfg.optimized_metric!r} not among {sorted(metrics)}")
    return value if math.isfinite(value) else float("nan")
