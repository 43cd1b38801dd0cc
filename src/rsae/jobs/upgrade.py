"""The RSAE upgrade of a trained teacher SAE (`python train.py sae=rational teacher.path=...`).

The RSAE's settings are the sae group's (`rsae.jobs.upgrade_config`), the phases' are `upgrade.*`.

1. init: copy the teacher's W_enc, b_enc, W_dec, b_dec exactly, start the gate from a fitted
   table, then calibrate (a, b, C_in, C_out) with an L2 objective on the teacher's real
   pre-activations (weights frozen): RSAE-init.
2. fine-tune: unfreeze everything, minimise ||x - x_hat||^2 + lambda * sparsity with Adam; with
   `upgrade.hold_l0` lambda adapts so that the training-batch L0 stays at the teacher's L0 on
   training rows.
Control: the teacher fine-tuned with its own gate and loss for the same steps and tokens
(`teacher_ft`), so that "beats the teacher" is not just "trained longer".

All four models are evaluated on the same held-out tokens; `upgrade.json` holds their metrics,
and `teacher_ft/`, `rsae_init/`, `rsae/` their exports. Each finished phase is saved at once, and
a rerun in the same run directory skips it, so a crash loses at most the phase in flight. A signal
during a fine-tune saves `<phase>/interrupted.ckpt` at the step reached, and the rerun (the command
in metrics.json) continues that phase from it. A loss, weight or metric that is not finite stops
the run (`status: failed`); nothing non-finite is exported.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rsae.data.lm import resolve_device
from rsae.eval.heldout import load_heldout
from rsae.eval.suite import EvalOptions, evaluate_sae
from rsae.io.saelens import CFG_FILE, build_sae, load_sae, save_sae
from rsae.io.teachers import load_teacher
from rsae.lit.l0_control import HoldL0
from rsae.sae import ARCHITECTURES, SAE
from rsae.sae.base import ConfigError, require
from rsae.sae.rational import RationalSAE, teacher_mechanism
from rsae.jobs.upgrade_config import acted_config, acted_sae_config, from_teacher_kwargs, teacher_coefficient
from rsae.jobs.common import (CheckpointOnInterrupt, finish_loggers, output_dir, read_checkpoint, require_finite,
                              require_finite_metrics, rerun_command, run_guarded, stop_after_step_on_signal, write_json)
from rsae.validate import check_config

log = logging.getLogger(__name__)

PHASES = ("teacher", "rsae_init", "rsae", "teacher_ft")


def collect_rows(dm, n_rows: int) -> torch.Tensor:
    """The first `n_rows` raw training activations of the stream (for calibration)."""
    rows, n = [], 0
    for batch in dm.train_dataloader():
        rows.append(batch[: n_rows - n].clone())  # the loader reuses its batch buffers
        n += rows[-1].shape[0]
        if n >= n_rows:
            break
    return torch.cat(rows).float()


def phase_lr_scales(scales: dict, sae: SAE, phase: str) -> dict[str, float]:
    """`module.lr_scales` for one fine-tune. The RSAE's phase takes them all (a prefix none of its
    parameters has is refused there, by the module); the control takes those its own parameters
    have (`log_threshold` for the RSAE's JumpReLU mask, say, when the teacher is a Gated SAE)."""
    if phase == "rsae":
        return dict(scales)
    names = [n for n, _ in sae.named_parameters()]
    kept = {k: v for k, v in scales.items() if any(n.startswith(k) for n in names)}
    if len(kept) < len(scales):
        log.info("%s: module.lr_scales %s not applied (no such parameter in %s)", phase,
                 sorted(set(scales) - set(kept)), type(sae).__name__)
    return kept


def phase_module(cfg: DictConfig, sae: SAE, phase: str, lr_scales: dict[str, float] | None = None):
    """The training module of one fine-tune: `module.*` with the upgrade's lr and warm-up, every step
    logged, and the learning-rate scales of `phase_lr_scales` plus the phase's own."""
    scales = phase_lr_scales({**(cfg.module.get("lr_scales") or {}), **(lr_scales or {})}, sae, phase)
    # (a dict given to instantiate is merged into the config's, not put in its place: drop the key)
    module_cfg = OmegaConf.masked_copy(cfg.module, [k for k in cfg.module if k != "lr_scales"])
    return instantiate(module_cfg, sae=sae, lr=cfg.upgrade.lr, warmup_steps=cfg.upgrade.warmup_steps,
                       log_every_n_steps=1, lr_scales=scales)


def finetune(cfg: DictConfig, sae: SAE, dm, scale: float, phase: str, run_dir: Path, target_l0: float, steps: int,
             logged: dict[str, Any], lr_scales: dict[str, float] | None = None) -> SAE:
    up = cfg.upgrade
    # Every step is logged here (the controller's coefficient and the L0 it holds are the story of
    # a fine-tune); HoldL0 itself reads the module's last_train_l0.
    module = phase_module(cfg, sae, phase, lr_scales)
    module.set_activation_scale(scale)
    callbacks = []
    lever = sae.sparsity_lever()  # the coefficient HoldL0 adapts (None: L0 is fixed by construction)
    if up.hold_l0 and lever is not None:
        callbacks.append(HoldL0(target_l0, attribute=lever, rate=up.hold_l0_rate))
    interrupted = run_dir / phase / "interrupted.ckpt"
    callbacks.append(CheckpointOnInterrupt(interrupted))
    ckpt_path = None
    if interrupted.is_file():
        read_checkpoint(interrupted)
        ckpt_path = interrupted
        log.info("%s: resuming from %s", phase, interrupted)
    logger = instantiate(cfg.logger, **_logger_phase_kwargs(cfg, phase)) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, max_steps=steps, callbacks=callbacks, logger=logger,
                          limit_val_batches=0, enable_checkpointing=False, default_root_dir=str(run_dir / phase))
    if trainer.logger is not None:
        trainer.logger.log_hyperparams(logged)  # the config as it acted (`acted_config`)
    try:
        with stop_after_step_on_signal(trainer):
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        module.check_finite()
    finally:
        finish_loggers(trainer)
    require_finite(module.sae.state_dict(), f"{phase} after fine-tuning")
    return module.sae.eval()


def _logger_phase_kwargs(cfg: DictConfig, phase: str) -> dict:
    target = str(cfg.logger.get("_target_", ""))
    if target.endswith("CSVLogger"):
        return {"version": phase}
    if target.endswith("WandbLogger"):
        return {"name": f"{cfg.task_name}-{phase}"}
    return {}


def teacher_metadata(teacher_dir: Path) -> dict:
    path = teacher_dir / CFG_FILE
    return json.loads(path.read_text()).get("metadata", {}) if path.is_file() else {}


def fine_tune_steps(cfg: DictConfig, meta: dict) -> int:
    """`upgrade.steps`, or (null) as many steps as an rsae-trained teacher had, else the paper's 22K."""
    if cfg.upgrade.steps is not None:
        return int(cfg.upgrade.steps)
    return int(meta.get("rsae_train_steps", 22_000))


def upgrade(cfg: DictConfig) -> dict[str, Any]:
    t_begin = time.perf_counter()
    run_dir = output_dir()
    check_config(cfg)  # before anything loads
    up = cfg.upgrade
    teacher_dir = Path(str(cfg.teacher.path))
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    t_cache = time.perf_counter() - t_begin  # building or checking the activation cache
    scale = float(dm.norm_scale)
    teacher_raw = load_teacher(teacher_dir, d_in=dm.d_in)
    require_finite(teacher_raw.state_dict(), f"teacher {teacher_dir}")
    mech = teacher_mechanism(teacher_raw)
    control_arch = control_architecture(teacher_raw, up.get("control_architecture"))
    teacher = teacher_raw.rescaled(1.0 / scale)  # normalised units, like every training run
    meta = teacher_metadata(teacher_dir)
    steps = fine_tune_steps(cfg, meta)
    require(steps >= 1, f"upgrade.steps must be >= 1, got {steps}")
    control_l0 = teacher_coefficient(meta, "l0_coefficient", up.control_l0_coefficient)  # the teacher's own, else this
    rsae_kw = from_teacher_kwargs(cfg, teacher, meta, control_l0)  # the sae group, checked
    torch.manual_seed(cfg.seed)

    held = load_heldout(dm, int(up.eval_tokens))
    opts = EvalOptions(batch_size=int(up.eval_batch_size), downstream=bool(up.downstream), probing=False, features=False,
                       l0_tolerances=tuple(up.l0_tolerances))
    # Every model is evaluated on the trainer's kind of device (the GPU when there is one, unless trainer=cpu).
    eval_device = torch.device("cpu") if str(cfg.trainer.get("accelerator", "auto")) == "cpu" else resolve_device("auto")
    lm = _load_lm(dm, eval_device) if up.downstream and held.has_tokens else None
    results_path = run_dir / "upgrade.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    rsae = RationalSAE.from_teacher(teacher, **rsae_kw)  # calibrated below, or given the saved init's weights
    acted = sae_settings(cfg, rsae, rsae_kw)
    same_run(results.get("settings"), {"teacher_path": str(teacher_dir), "steps": steps, **acted}, run_dir)

    # Wall seconds of each phase (summed over reruns of the same run directory), to see where the time goes.
    seconds: dict[str, float] = results.setdefault("seconds", {})
    t_setup = time.perf_counter() - t_begin

    @contextmanager
    def timed(part: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds[part] = round(seconds.get(part, 0.0) + time.perf_counter() - t0, 2)

    def evaluate(name: str, sae_norm: SAE) -> None:
        raw = sae_norm.rescaled(scale).eval().to(eval_device)
        with timed(f"eval_{name}"):
            metrics, _ = evaluate_sae(raw, held, opts, lm=lm, hook=getattr(dm, "hook", None), layer=getattr(dm, "layer", None))
        require_finite_metrics(metrics, ("mse", "fvu"), f"{name} on the held-out tokens")
        results[name] = metrics
        results["settings"] = settings
        write_json(results_path, results)
        log.info("%s: %s", name, {k: round(v, 5) for k, v in metrics.items() if isinstance(v, float)})

    settings = {  # a rerun keeps what earlier phases recorded (the calibration's statistics, the L0 target)
        **results.get("settings", {}),
        "teacher_path": str(teacher_dir), "teacher_mechanism": mech, "teacher_architecture": teacher_raw.architecture,
        "l0_counting": "exact non-zero count" + (f"; l0_tol_<eps>: |z| > eps (raw units) for eps in {list(up.l0_tolerances)}" if up.l0_tolerances else ""),
        "steps": steps, "batch_size": int(cfg.data.batch_size), "hold_l0": bool(up.hold_l0),
        "calibration_tokens": int(up.calibration_tokens), "eval_tokens": held.n_rows, "sparsity": str(rsae_kw["sparsity"]),
        "gate_lr_scale": float(up.get("gate_lr_scale", 1.0)), "control_architecture": control_arch, **acted,
    }

    # Teacher
    if "teacher" not in results:
        evaluate("teacher", teacher)

    # Training rows (the first of the shuffled stream): the gate is calibrated on the teacher's
    # pre-activations there, and the fine-tuning L0 target is the teacher's L0 there. HoldL0 sees
    # training batches, and held-out text can differ (on SmolLM2 / Shakespeare the teacher's L0 is
    # 7.4 on training rows and 8.7 held out): holding training L0 at the held-out value would let
    # the fine-tuned models end 15-20% denser than the teacher on the held-out tokens.
    with timed("setup"):  # data, teacher, held-out tokens and LM above, calibration rows here
        x = collect_rows(dm, int(up.calibration_tokens)) * scale
    seconds["setup"] = round(seconds["setup"] + t_setup, 2)
    seconds["setup_cache"] = round(seconds.get("setup_cache", 0.0) + t_cache, 2)  # part of setup
    # The rows arrive where the stream puts them (the GPU with data.shuffle_device=cuda): the
    # teacher's pre-activations and the calibration run there; the models come back to the CPU.
    device = x.device
    with torch.no_grad():
        h = teacher.to(device).pre_acts(x)
        z_teacher = teacher.activation(h)
    teacher.cpu()
    target_l0 = float((z_teacher != 0).sum(-1).float().mean())
    settings["l0_target_train"] = target_l0

    # 1. RSAE-init: copy, fit the gate, calibrate on the teacher's real pre-activations.
    init_dir = run_dir / "rsae_init"
    if "rsae_init" in results and (init_dir / CFG_FILE).is_file():
        # A rerun: the settings of this config, the calibrated weights of the saved init.
        rsae.load_state_dict(load_sae(init_dir).rescaled(1.0 / scale).state_dict())  # settings checked by same_run
    else:
        with timed("calibrate"):
            stats = rsae.to(device).calibrate(h, z_teacher, steps=int(up.calibration_steps))
        rsae.cpu()
        require_finite(rsae.state_dict(), "rsae_init after calibration")
        settings["calibration"] = stats
        save_sae(rsae, init_dir, scale=scale, metadata={"phase": "rsae_init", **settings})
        evaluate("rsae_init", rsae)
    logged = acted_config(cfg, settings["rsae_sae_config"], {"steps": steps, "control_l0_coefficient": control_l0})
    write_json(run_dir / "config.json", logged)
    del x, h, z_teacher  # [calibration_tokens, d_sae] each: free before fine-tuning

    # 2. Fine-tune the RSAE.
    if "rsae" not in results or not (run_dir / "rsae" / CFG_FILE).is_file():
        rsae.train()
        for p in rsae.parameters():
            p.requires_grad_(True)
        gate_scale = float(up.get("gate_lr_scale", 1.0))
        with timed("finetune_rsae"):
            rsae = finetune(cfg, rsae, dm, scale, "rsae", run_dir, target_l0, steps, logged,
                            lr_scales={"rational_gate.": gate_scale} if gate_scale != 1.0 else None)
        save_sae(rsae, run_dir / "rsae", scale=scale, metadata={"phase": "rsae", **settings})
        (run_dir / "rsae" / "interrupted.ckpt").unlink(missing_ok=True)
        evaluate("rsae", rsae)

    # Control: the teacher fine-tuned with its own gate (or as a parent architecture) for the same steps and tokens.
    if up.control and ("teacher_ft" not in results or not (run_dir / "teacher_ft" / CFG_FILE).is_file()):
        control = as_architecture(teacher_raw.rescaled(1.0 / scale), control_arch).train()
        control.configure_control({"l1_coefficient": rsae_kw["l1_coefficient"], "l0_coefficient": control_l0})
        with timed("finetune_teacher_ft"):
            control_logged = {**logged, "sae": {"architecture": control_arch, "teacher_path": str(teacher_dir),
                                                "l1_coefficient": rsae_kw["l1_coefficient"], "l0_coefficient": control_l0}}
            control = finetune(cfg, control, dm, scale, "teacher_ft", run_dir, target_l0, steps, control_logged)
        save_sae(control, run_dir / "teacher_ft", scale=scale, metadata={"phase": "teacher_ft", **settings})
        (run_dir / "teacher_ft" / "interrupted.ckpt").unlink(missing_ok=True)
        evaluate("teacher_ft", control)

    write_json(results_path, results)
    summary = {f"upgrade/{phase}/{k}": v for phase in PHASES if phase in results for k, v in results[phase].items()
               if isinstance(v, (int, float))}
    _log_summary(cfg, summary)
    write_json(run_dir / "metrics.json", {"status": "ok", **summary})
    return summary


def control_architecture(teacher: SAE, name: str | None) -> str:
    """The control's architecture: the teacher's own, or (`upgrade.control_architecture`) one its
    class derives from, which trains the same weights without the subclass's extra loss terms (a
    Matryoshka teacher as `batchtopk`: the same selection, no nested-prefix reconstructions)."""
    own = teacher.architecture
    if name is None or ARCHITECTURES[name] is type(teacher):
        return own
    parents = [a for a, cls in ARCHITECTURES.items() if cls is not type(teacher) and isinstance(teacher, cls)]
    require(name in parents, f"upgrade.control_architecture={name}: the teacher is a {own} SAE; the control can be "
            f"{own} (null) or an architecture it derives from ({', '.join(parents) or 'none'})")
    return name


def as_architecture(sae: SAE, name: str) -> SAE:
    """`sae` itself, or the same weights as the parent architecture `name` (control_architecture)."""
    if name == sae.architecture:
        return sae
    config = {**sae.export_config(), "rsae_architecture": name}
    return build_sae(config, sae.export_tensors(1.0)).to(next(sae.parameters()).device)


def same_run(saved: dict | None, now: dict[str, Any], run_dir: Path) -> None:
    """A rerun in a run directory must ask for what its finished phases were built with."""
    if not saved:
        return
    now = json.loads(json.dumps(now))  # as upgrade.json stores it
    changed = sorted(k for k in now if saved.get(k) is not None and saved[k] != now[k])  # None: not yet built
    changed += sorted(f"sae.{k}" for k in now.get("rsae_sae_config", {})
                      if saved.get("rsae_sae_config", {}).get(k, now["rsae_sae_config"][k]) != now["rsae_sae_config"][k])
    changed = [k for k in changed if k != "rsae_sae_config"]
    if changed:
        raise ConfigError(f"{run_dir} holds an upgrade built with other settings ({', '.join(changed)} differ): rerun "
                          "with the same overrides, or in a new hydra.run.dir")


def sae_settings(cfg: DictConfig, rsae: RationalSAE, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The RSAE's settings as built, for upgrade.json's settings and the exports' metadata."""
    sae = acted_sae_config(cfg, rsae, kwargs)
    return {"gate": rsae.gate, "degrees": sae["degrees"], "rsae_sae_config": sae}


def _load_lm(dm, device: torch.device):
    from rsae.data.lm import load_lm

    kwargs = getattr(dm, "lm_kwargs", None)
    if kwargs is None:
        return None
    model, _ = load_lm(**kwargs, device=device)
    return model.eval()


def _log_summary(cfg: DictConfig, summary: dict) -> None:
    if not cfg.get("logger") or not str(cfg.logger.get("_target_", "")).endswith("WandbLogger"):
        return
    logger = instantiate(cfg.logger, name=f"{cfg.task_name}-summary")
    logger.log_metrics(summary)
    logger.experiment.finish()


def main(cfg: DictConfig) -> float | None:
    # A rerun in the same run directory skips the finished phases and resumes the interrupted one.
    summary = run_guarded(upgrade, cfg, resume=lambda _ckpt: rerun_command(f"hydra.run.dir={output_dir()}"))
    if summary.get("status") == "failed":
        return float("nan")
    value = summary.get(cfg.optimized_metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else float("nan")
