"""One LightningModule for every SAE: the SAE supplies its loss terms, this runs the optimisation.

Raw activations are multiplied by `act_scale` (E||x|| = sqrt(d_in), estimated by the data module)
before they reach the SAE; reported MSE is converted back to raw units so it compares across
runs and with exported SAEs.

Speed: with `compile=True` the SAE's training step (`train_losses` around `sae.training_output`:
forward, losses, dead-latent bookkeeping) and the decoder-norm constraint are compiled with
`torch.compile` (`compile_mode: reduce-overhead` also replays the step as CUDA graphs). Mixed
precision comes from the trainer (e.g. `precision: bf16-mixed`, with float32 master
weights; Adam is fused on CUDA, with the gradient clipping folded into it: `clip_gradients`).
Nothing in a step makes the host wait for the GPU: training metrics are tensors handed to
Lightning, only on the steps the logger writes (`log_every_n_steps`: None follows the trainer's).
Lightning's `log` costs host time on every call (logging `train/l0` every step cost about 0.4 ms
per step on a 2-core CPU, a sizeable part of a small SAE's step on a GPU), so nothing is logged on
the other steps; the step's L0 (a device tensor) is kept in `last_train_l0` for step-level
callbacks such as HoldL0.

`cuda_graph=True` goes further for small, host-bound SAEs: the step up to the optimizer (forward,
backward, decoder-gradient projection, clipping) is captured once as a CUDA graph and replayed
(`rsae.lit.graph_step`), and the module drives its own optimisation (Lightning's manual
optimisation, one `optimizer.step` per batch), which also spares Lightning's closure machinery.
Adam (one fused kernel) and the decoder re-normalisation run after the replay. Single device,
bf16-mixed or float32 only; off CUDA the same path runs uncaptured.

The compiled and captured steps and the fused clipping live in `rsae.lit.fast_step` (`FastStep`,
which this module inherits); this file holds the plain step, logging, checks and the optimiser.

A diverged run stops: every step folds "was the loss finite?" into a device scalar holding the
first step whose loss was NaN or infinite (three small kernels, queued like the rest of the step;
inside the captured graph with `cuda_graph`). The host reads that scalar only where it waits for
the GPU anyway: on the steps the logger writes (after the step, where Lightning's own read of the
logged values would wait), before a checkpoint is written, and when the fit ends; it then raises
`NonFiniteError` naming the first such step. So a NaN is caught within `log_every_n_steps` steps
of its step, and no checkpoint or export holds what came after it.
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch import Tensor

from rsae.errors import NonFiniteError
from rsae.eval.metrics import ReconstructionMetrics, feature_recovery
from rsae.lit.fast_step import FastStep, clip_gradients
from rsae.lit.graph_step import CapturedStep
from rsae.sae.base import SAE, require

log = logging.getLogger(__name__)

NEVER = 2**62  # "no step yet" in the first-non-finite-step scalar


def lr_multiplier(step: int, max_steps: int, warmup_steps: int, decay_fraction: float, min_lr_ratio: float) -> float:
    """Linear warm-up, constant, then linear decay over the last `decay_fraction` of training."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(decay_fraction * max_steps)
    decay_start = max_steps - decay_steps
    if decay_steps <= 0 or step < decay_start:
        return 1.0
    frac = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1.0 - min_lr_ratio) * frac


class SAEModule(FastStep, L.LightningModule):
    def __init__(
        self,
        sae: SAE,
        lr: float = 4e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        decay_fraction: float = 0.2,
        min_lr_ratio: float = 0.0,
        ground_truth: Tensor | None = None,
        l0_tolerances: tuple[float, ...] = (),
        grad_clip: float | None = 1.0,
        compile: bool = False,
        compile_mode: str | None = None,
        log_every_n_steps: int | None = None,
        lr_scales: dict[str, float] | None = None,
        ddp_split_step: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        super().__init__()
        require(lr > 0, f"lr must be > 0, got {lr}")
        require(log_every_n_steps is None or log_every_n_steps >= 1, f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        require(0 <= decay_fraction <= 1, f"decay_fraction must be in [0, 1], got {decay_fraction}")
        require(0 <= min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.sae = sae
        self.lr, self.betas = lr, tuple(betas)
        # Learning-rate multipliers by parameter-name prefix, e.g. {"log_threshold": 10} or
        # {"rational_gate.": 10}: parameters that take many small Adam steps to move (a threshold in
        # log space, a handful of shared gate coefficients) can be given a faster rate; 0 freezes
        # them (Adam's step is lr times its normalised moment: exactly no change).
        self.lr_scales = {str(k): float(v) for k, v in (lr_scales or {}).items()}
        for name, value in self.lr_scales.items():
            require(value >= 0 and math.isfinite(value), f"module.lr_scales[{name!r}] must be a number >= 0, got {value}")
            require(any(n.startswith(name) for n, _ in sae.named_parameters()),
                    f"module.lr_scales: no parameter of {type(sae).__name__} starts with {name!r} "
                    f"(parameters: {sorted({n.split('.')[0] for n, _ in sae.named_parameters()})})")
        self.warmup_steps, self.decay_fraction, self.min_lr_ratio = warmup_steps, decay_fraction, min_lr_ratio
        self.register_buffer("act_scale", torch.tensor(1.0))
        self.ground_truth = ground_truth
        # Clipped here rather than by Lightning, which refuses to clip for fused Adam under AMP.
        self.grad_clip = grad_clip
        self.val_metrics = ReconstructionMetrics(sae.d_in, sae.d_sae, l0_tolerances=tuple(l0_tolerances))
        require(compile_mode in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                f"compile_mode must be null, default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs, got {compile_mode!r}")
        self.compile_step = bool(compile)  # (not `self.compile`: nn.Module.compile is a method)
        self.compile_mode = compile_mode
        self.log_every_n_steps = log_every_n_steps
        self.ddp_split_step = bool(ddp_split_step)
        require(not (cuda_graph and compile_mode == "reduce-overhead"),
                "module.cuda_graph captures the whole step already: use compile_mode null (or default), not reduce-overhead")
        self.cuda_graph = bool(cuda_graph)
        self.automatic_optimization = not self.cuda_graph  # the captured step drives the optimizer itself
        self.sae.step_in_cuda_graph = self.cuda_graph
        self._captured = CapturedStep()
        self._captured_renorm = CapturedStep(max_graphs=1)
        self._step_fns: dict[str, object] = {}
        self._step_tensor: Tensor | None = None
        self._renorm_token: Tensor | None = None
        self._first_nonfinite: Tensor | None = None  # int64 on the device: see watch_loss
        self._check_due = False

    def train_losses(self, x: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """`sae.training_output` reduced to what training uses: the loss, the (detached) loss terms
        and the mean L0. Compiled, the [batch, d_sae] pre-activations and codes then stay inside
        the graph instead of being written out as outputs."""
        out = self.sae.training_output(x, step)
        return out.loss, {k: v.detach() for k, v in out.losses.items()}, out.l0()

    def _log_now(self) -> bool:
        """Whether the logger writes this step's metrics (Lightning's rule for on_step values)."""
        trainer = self._trainer
        if trainer is None:
            return True
        every = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        return (self.global_step + 1) % every == 0 or bool(getattr(trainer, "should_stop", False))

    def set_activation_scale(self, scale: float) -> None:
        require(scale > 0 and scale == scale, f"activation scale must be positive and finite, got {scale}")
        self.act_scale.fill_(float(scale))

    # --- training -----------------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor | None:
        if self.cuda_graph:
            return self._captured_training_step(batch)
        x = batch * self.act_scale
        loss, losses, l0 = self.run_train(x, self.global_step)
        self.watch_loss(loss.detach(), self.global_step)
        self._last_terms, self._last_terms_step = losses, self.global_step  # named by check_finite
        self.last_train_l0 = l0
        if self._trainer is not None and self.trainer.world_size > 1:  # dead latents judged on every rank's rows
            self.sae.merge_firing_across_ranks(x.shape[0])
        self._check_due = self._log_now()
        if self._check_due:
            self._log_train(self.global_step, loss.detach(), losses, l0)
        return loss

    def _captured_training_step(self, batch: Tensor) -> None:
        """Manual optimisation around `forward_backward`: Lightning counts the step through
        `optimizer.step`, whose closure is the (replayed) step."""
        step, log_now = self.global_step, self._log_now()  # before optimizer.step advances global_step
        self._check_due = log_now
        opt = self.optimizers()
        out = []
        opt.step(closure=lambda: out.append(self.forward_backward(batch, step, opt)) or out[-1][0])
        self.renormalize_decoder()
        self.lr_schedulers().step()
        loss, losses, l0 = out[-1]
        self._last_terms, self._last_terms_step = losses, step  # (the graph's outputs: the latest step's)
        if log_now:  # copies: the next replay overwrites the graph's outputs
            self._log_train(step, loss.clone(), {k: v.clone() for k, v in losses.items()}, l0.clone())
        self.last_train_l0 = l0
        return None

    def watch_loss(self, loss: Tensor, step: int | Tensor) -> None:
        """Fold this step's loss into the first-non-finite-step scalar, without the host waiting."""
        first = self._first_nonfinite
        if first is None or first.device != loss.device:
            first = self._first_nonfinite = torch.full((), NEVER, dtype=torch.int64, device=loss.device)
        torch.minimum(first, torch.where(torch.isfinite(loss), NEVER, step), out=first)

    def check_finite(self) -> None:
        """Raise NonFiniteError if a step's loss was NaN or infinite (waits for the GPU: call it
        where the host waits anyway). Under DDP every rank raises at the same step."""
        if self._first_nonfinite is None:
            return
        first = self._first_nonfinite
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            first = first.clone()
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        first = int(first)
        if first == NEVER:
            return
        terms = ", ".join(f"{k}={float(v):g}" for k, v in (self._last_terms or {}).items())
        raise NonFiniteError(f"the training loss is not finite at step {first}"
                             + (f" (loss terms at step {self._last_terms_step}: {terms})" if terms else "")
                             + "; lower module.lr (or module.grad_clip), or check the data")

    _last_terms: dict[str, Tensor] | None = None
    _last_terms_step: int | None = None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._check_due:  # a logged step: Lightning reads its values from the GPU right after this
            self._check_due = False
            self.check_finite()

    def _log_train(self, step: int, loss: Tensor, losses: dict[str, Tensor], l0: Tensor) -> None:
        logs = {"train/l0": l0, "train/loss": loss}
        logs["train/mse"] = losses["mse"] / self.act_scale.pow(2)
        logs.update({f"train/{k}_loss": v for k, v in losses.items() if k != "mse"})
        logs["train/dead_fraction"] = self.sae.dead_mask().float().mean()
        logs.update({f"train/{k}": v for k, v in self.sae.train_metrics().items()})
        logs["train/lr"] = self.lr * self._lr_mult(step)
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False)

    def on_fit_start(self) -> None:
        if not self.cuda_graph:
            return
        trainer = self.trainer
        require(trainer.world_size == 1, f"module.cuda_graph runs on one device; this run has {trainer.world_size} "
                                         "processes (use module.cuda_graph=false with DDP)")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        require(scaler is None, "module.cuda_graph cannot drive a gradient scaler (fp16 mixed precision): "
                                "use trainer.precision=bf16-mixed or 32")
        if self.device.type != "cuda":
            log.info("module.cuda_graph: no CUDA device, the step runs uncaptured")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # no checkpoint of a diverged run
        checkpoint["rsae_cuda_graph"] = self.cuda_graph
        # Coefficients a callback adapts during training (HoldL0) are 0-d tensor attributes of the
        # SAE, not parameters or buffers: kept here so that a resumed run goes on from their values.
        checkpoint["rsae_sae_scalars"] = {k: float(v) for k, v in vars(self.sae).items()
                                          if isinstance(v, Tensor) and v.ndim == 0 and v.is_floating_point()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning counts steps in different places for automatic and manual optimisation: a
        # resumed run that switched would restart its step count.
        saved = bool(checkpoint.get("rsae_cuda_graph", False))
        require(saved == self.cuda_graph, f"this checkpoint was trained with module.cuda_graph={str(saved).lower()}; "
                                          f"resume it with the same setting")
        for name, value in checkpoint.get("rsae_sae_scalars", {}).items():
            setattr(self.sae, name, value)  # a float; the callback that adapts it makes it a tensor again

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.cuda_graph:  # forward_backward did this, inside the captured step
            return
        self.step_fn("remove_parallel_decoder_grad")()
        # Fold the clipping into a fused Adam unless a GradScaler (fp16) also drives its grad_scale.
        scaler = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None)
        fold = optimizer if scaler is None else None
        if self.grad_clip:
            clip_gradients(self.sae.parameters(), self.grad_clip, fold)
        else:  # a grad_scale left from clipping would keep scaling the update
            inner = getattr(fold, "_optimizer", fold)  # a LightningOptimizer wraps the real one
            if getattr(inner, "grad_scale", None) is not None:
                inner.grad_scale = None

    def optimizer_step(self, *args, **kwargs) -> None:
        # Re-normalise right after the update, before any callback (e.g. a checkpoint) sees it.
        super().optimizer_step(*args, **kwargs)
        self.renormalize_decoder()

    def _lr_mult(self, step: int) -> float:
        max_steps = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1
        return lr_multiplier(step, max_steps, self.warmup_steps, self.decay_fraction, self.min_lr_ratio)

    def configure_optimizers(self):
        fused = self.device.type == "cuda"
        opt = torch.optim.Adam(self._param_groups(), lr=self.lr, betas=self.betas, fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_mult)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _param_groups(self) -> list[dict]:
        """One Adam group per learning-rate multiplier (the first matching prefix wins)."""
        scales = {**self.sae.lr_scales(), **self.lr_scales}
        groups: dict[float, list] = {}
        for name, param in self.sae.named_parameters():
            scale = next((v for k, v in scales.items() if name.startswith(k)), 1.0)
            groups.setdefault(scale, []).append(param)
        return [{"params": params, "lr": self.lr * scale} for scale, params in groups.items()]

    # --- validation ---------------------------------------------------------------------------
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        x = batch.float()
        z = self.sae.encode(x * self.act_scale)
        x_hat = self.sae.decode(z) / self.act_scale
        self.val_metrics.update(x, x_hat.float(), z)

    def on_validation_epoch_end(self) -> None:
        metrics = {f"val/{k}": v for k, v in self.val_metrics.compute().items()}
        if self.ground_truth is not None:
            rec = feature_recovery(self.ground_truth.to(self.device), self.sae.W_dec)
            metrics.update({f"val/{k}": torch.tensor(v) for k, v in rec.items()})
        self.val_metrics.reset()
        self.log_dict(metrics, sync_dist=False)
