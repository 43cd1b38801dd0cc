"""Lightning callbacks: downstream (spliced-LM) evaluation during training, a step progress bar.

`DownstreamEval` runs `rsae.eval.downstream.downstream_metrics` (the same function as
`evaluate.py`) on held-out sequences of the data module and logs

    val/ce_clean  val/ce_spliced  val/ce_zero  val/delta_ce  val/loss_recovered  val/kl

with the SAE's reconstruction `sae(x * act_scale) / act_scale` spliced in at the hook, plus
`val/n_sequences` (how many held-out sequences they cover). The sequences are the first
`ceil(n_tokens / context_size)` held-out ones, the rule `evaluate.py` (`eval.n_tokens`) and the
upgrade (`upgrade.eval_tokens`) use, so equal token counts give the same held-out set. It runs at
the end of every validation loop (`at_validation`, so the final `trainer.validate` of train.py
puts these keys into `metrics.json`) and/or every `every_n_steps` training steps. Data modules
without token sequences (synthetic data) make it a no-op, announced once.

`step_progress_bar` gives a training bar that counts optimizer steps against `max_steps`
(Lightning's own bar counts batches of an epoch, which a step-based run over an endless stream
never finishes).
"""

from __future__ import annotations

import logging
import math

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from rsae.eval.downstream import downstream_metrics, sae_reconstructor

log = logging.getLogger(__name__)

LOGGED_KEYS = ("ce_clean", "ce_spliced", "ce_zero", "delta_ce", "loss_recovered", "kl")


class DownstreamEval(L.Callback):
    """Spliced-LM metrics on held-out sequences while training.

    Args:
        n_tokens: held-out tokens evaluated each time: the first `ceil(n_tokens / context_size)`
            held-out sequences (all of them when the cache holds fewer), always the same ones.
        n_sequences: evaluate this many first held-out sequences instead (None: from n_tokens).
        batch_size: sequences per LM forward pass.
        every_n_steps: also run every this many training steps (None/0: only at validation).
        at_validation: run at the end of each validation loop.
        autocast: LM autocast dtype (`auto` = bf16 on CUDA, none on CPU).
        prefix: key prefix of the logged metrics.
        progress: show a progress bar for the spliced pass while the trainer shows its own.
    """

    def __init__(self, n_tokens: int = 2048, n_sequences: int | None = None, batch_size: int = 8,
                 every_n_steps: int | None = None, at_validation: bool = True, autocast: str | None = "auto",
                 prefix: str = "val/", progress: bool = True) -> None:
        if n_tokens < 1:
            raise ValueError(f"callbacks.downstream_eval.n_tokens must be >= 1, got {n_tokens}")
        if n_sequences is not None and n_sequences < 1:
            raise ValueError(f"callbacks.downstream_eval.n_sequences must be >= 1 or null, got {n_sequences}")
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"callbacks.downstream_eval.every_n_steps must be >= 0 or null, got {every_n_steps}")
        self.n_tokens, self.n_sequences, self.batch_size = int(n_tokens), n_sequences, int(batch_size)
        self.progress = bool(progress)
        self.every_n_steps = int(every_n_steps or 0)
        self.at_validation = bool(at_validation)
        self.autocast, self.prefix = autocast, prefix
        self._lm = None
        self._tokens = None
        self._disabled: str | None = None
        self._last_step: int | None = None

    # ---- setup -------------------------------------------------------------------------------
    def _ready(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        if self._disabled is not None:
            return False
        if self._lm is not None:
            return True
        dm = trainer.datamodule
        if dm is None or not all(hasattr(dm, a) for a in ("eval_tokens", "lm_kwargs", "hook", "layer")):
            self._disabled = f"the data module ({type(dm).__name__}) has no token sequences / LM"
            log.info("DownstreamEval disabled: %s", self._disabled)
            return False
        from rsae.data.lm import load_lm

        input_ids, keep = dm.eval_tokens()
        if len(input_ids) == 0:
            self._disabled = "no held-out sequences"
            log.warning("DownstreamEval disabled: %s", self._disabled)
            return False
        n = self.n_sequences or math.ceil(self.n_tokens / input_ids.shape[1])
        self._tokens = (input_ids[:n], keep[:n])
        if callable(getattr(dm, "language_model", None)):  # the model the harvest loaded, when there was one
            self._lm = dm.language_model(pl_module.device)[0].to(pl_module.device)
        else:
            kw = dm.lm_kwargs
            self._lm, _ = load_lm(kw["name_or_path"], kw.get("gguf_file"), kw.get("dtype", "float32"), pl_module.device,
                                  kw.get("revision"))
        self._hook, self._layer = dm.hook, dm.layer
        return True

    # ---- the computation -----------------------------------------------------------------------
    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        if not self._ready(trainer, pl_module):
            return None
        sae = pl_module.sae
        was_training = sae.training
        sae.eval()  # inference behaviour (e.g. BatchTopK's threshold), no firing statistics
        bar = trainer.progress_bar_callback
        try:
            out = downstream_metrics(self._lm, self._hook, self._layer, sae_reconstructor(sae, pl_module.act_scale),
                                     *self._tokens, batch_size=self.batch_size, autocast_dtype=self.autocast,
                                     progress=self.progress and bar is not None and bar.is_enabled and trainer.is_global_zero,
                                     desc="spliced CE")
        finally:
            sae.train(was_training)
        metrics = {f"{self.prefix}{k}": float(out[k]) for k in LOGGED_KEYS}
        metrics[f"{self.prefix}n_sequences"] = float(out["n_sequences"])
        return metrics

    # ---- hooks -----------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_validation or trainer.sanity_checking:
            return
        metrics = self.compute(trainer, pl_module)
        if metrics:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        metrics = self.compute(trainer, pl_module)
        if metrics and trainer.is_global_zero:
            # Straight to the loggers: Lightning would hold step-level values until log_every_n_steps.
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, with the training bar counting optimizer steps up to `max_steps`."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.unit = "step"
        bar.set_description(self.train_description, refresh=False)
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # a resumed run starts where it stopped
        bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total or 0):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # also refreshes


def step_progress_bar(enabled: bool = True, refresh_rate: int = 1) -> L.Callback:
    """The training progress bar (`StepProgressBar`), or a no-op callback when the trainer shows
    none (`trainer.enable_progress_bar=false`: Lightning refuses a bar callback then)."""
    return StepProgressBar(refresh_rate=refresh_rate) if enabled else L.Callback()
