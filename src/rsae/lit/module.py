"""One LightningModule for every SAE: the SAE supplies its loss terms, this runs the optimisation.

Raw activations are multiplied by `act_scale` (E||x|| = sqrt(d_in), estimated by the data module)
before they reach the SAE; reported MSE is converted back to raw units so it compares across
runs and with exported SAEs.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from rsae.eval.metrics import ReconstructionMetrics, feature_recovery
from rsae.sae.base import SAE, require


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


class SAEModule(L.LightningModule):
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
    ) -> None:
        super().__init__()
        require(lr > 0, f"lr must be > 0, got {lr}")
        require(0 <= decay_fraction <= 1, f"decay_fraction must be in [0, 1], got {decay_fraction}")
        require(0 <= min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.sae = sae
        self.lr, self.betas = lr, tuple(betas)
        self.warmup_steps, self.decay_fraction, self.min_lr_ratio = warmup_steps, decay_fraction, min_lr_ratio
        self.register_buffer("act_scale", torch.tensor(1.0))
        self.ground_truth = ground_truth
        # Clipped here rather than by Lightning, which refuses to clip for fused Adam under AMP.
        self.grad_clip = grad_clip
        self.val_metrics = ReconstructionMetrics(sae.d_in, sae.d_sae, l0_tolerances=tuple(l0_tolerances))

    def set_activation_scale(self, scale: float) -> None:
        require(scale > 0 and scale == scale, f"activation scale must be positive and finite, got {scale}")
        self.act_scale.fill_(float(scale))

    # --- training -----------------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x = batch * self.act_scale
        out = self.sae.training_output(x, self.global_step)
        loss = out.loss
        scale2 = self.act_scale.pow(2)
        logs = {"train/loss": loss, "train/mse": out.losses["mse"].detach() / scale2}
        logs.update({f"train/{k}_loss": v.detach() for k, v in out.losses.items() if k != "mse"})
        logs["train/l0"] = (out.z.detach() != 0).float().sum(-1).mean()
        logs["train/dead_fraction"] = self.sae.dead_mask().float().mean()
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False)
        self.log("train/lr", self.lr * self._lr_mult(self.global_step), on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.sae.remove_parallel_decoder_grad()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.grad_clip, foreach=True)

    def optimizer_step(self, *args, **kwargs) -> None:
        # Re-normalise right after the update, before any callback (e.g. a checkpoint) sees it.
        super().optimizer_step(*args, **kwargs)
        self.sae.normalize_decoder()

    def _lr_mult(self, step: int) -> float:
        max_steps = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1
        return lr_multiplier(step, max_steps, self.warmup_steps, self.decay_fraction, self.min_lr_ratio)

    def configure_optimizers(self):
        fused = self.device.type == "cuda"
        opt = torch.optim.Adam(self.sae.parameters(), lr=self.lr, betas=self.betas, fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_mult)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

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
