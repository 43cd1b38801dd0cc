"""JumpReLU SAE: z = h * H(h - theta), per-latent threshold theta = exp(log_threshold).

The step H has zero gradient almost everywhere, so theta learns through a straight-through
estimator with a rectangle kernel of width `bandwidth` (Rajamanoharan et al. 2024): the
gradient of H(h - theta) w.r.t. theta is -K((h - theta)/eps)/eps. The sparsity penalty is the
L0 count (step, same estimator) or a smooth tanh surrogate; either way thresholds respond to
`l0_coefficient`, which is what makes L0 follow the coefficient.

With `l0_target` the penalty pulls the batch-mean L0 toward the target instead of down:
`l0_coefficient * (L0 / l0_target - 1)^2`, L0 through the same estimator, so the thresholds'
gradient changes sign at the target (denser: they rise; sparser: they fall).

Training step, unless `rsae.sae.fast.disabled()`: the encoder GEMM without an input gradient, the
L0 count straight from h (no float32 copy of the [batch, d_sae] pre-activations) and the
dead-latent counter updated without host waits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rsae.sae import fast
from rsae.sae.base import SAE, SAEOutput, require
from rsae.sae.mechanisms.jumprelu import L0 as _L0, Step as _Step, jumprelu
from rsae.sae.mechanisms.relu import linear_warmup


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    mechanism = "jumprelu"

    def __init__(
        self,
        d_in: int,
        d_sae: int | None = None,
        l0_coefficient: float = 1e-3,
        l0_warmup_steps: int = 0,
        bandwidth: float = 0.05,
        init_threshold: float = 0.1,
        penalty: str = "step",
        tanh_scale: float = 4.0,
        threshold_lr_scale: float = 1.0,
        l0_target: float | None = None,
        **kw,
    ) -> None:
        require(l0_coefficient >= 0, f"l0_coefficient must be >= 0, got {l0_coefficient}")
        require(threshold_lr_scale > 0, f"threshold_lr_scale must be > 0, got {threshold_lr_scale}")
        require(bandwidth > 0, f"bandwidth must be > 0, got {bandwidth}")
        require(init_threshold > 0, f"init_threshold must be > 0, got {init_threshold}")
        require(penalty in ("step", "tanh"), f"penalty must be 'step' or 'tanh', got {penalty!r}")
        require(l0_target is None or l0_target > 0, f"l0_target must be > 0 or null, got {l0_target}")
        # The tanh surrogate is not a count: its value sits below the L0 it stands for, so a target
        # on it would not be a target on L0.
        require(l0_target is None or penalty == "step", f"l0_target needs penalty=step, got penalty={penalty!r}")
        super().__init__(d_in, d_sae, **kw)
        require(l0_target is None or l0_target <= self.d_sae, f"l0_target must be <= d_sae ({self.d_sae}), got {l0_target}")
        self.l0_target = None if l0_target is None else float(l0_target)
        self.l0_coefficient, self.l0_warmup_steps = l0_coefficient, l0_warmup_steps
        self.bandwidth, self.penalty, self.tanh_scale = bandwidth, penalty, tanh_scale
        self.log_threshold = nn.Parameter(torch.full((self.d_sae,), math.log(init_threshold)))
        # Adam moves log(theta) by about lr per step whatever the L0 coefficient, so with the
        # weights' lr a short run cannot move the thresholds far and L0 barely follows the
        # coefficient; a faster rate for the thresholds lets it (the training module reads this).
        self.threshold_lr_scale = float(threshold_lr_scale)

    def lr_scales(self) -> dict[str, float]:
        return {"log_threshold": self.threshold_lr_scale} if self.threshold_lr_scale != 1.0 else {}

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activation(self, h: Tensor) -> Tensor:
        return jumprelu(h, self.threshold, self.bandwidth)

    def aux_losses(self, x: Tensor, out: SAEOutput, step: int) -> dict[str, Tensor]:
        coef = self.l0_coefficient * linear_warmup(step, self.l0_warmup_steps)
        if self.penalty == "step" and fast.enabled():
            l0 = _L0.apply(out.h, self.threshold.float(), self.bandwidth)
        elif self.penalty == "step":
            l0 = _Step.apply(out.h.float(), self.threshold.float(), self.bandwidth).sum(-1).mean()
        else:  # smooth surrogate: tanh(c * |z| * ||W_dec||)
            l0 = torch.tanh(self.tanh_scale * out.z.float().abs() * self.decoder_norms().float()).sum(-1).mean()
        if self.l0_target is not None:
            return {"l0": coef * (l0 / self.l0_target - 1).pow(2)}
        return {"l0": coef * l0}

    def sparsity_lever(self) -> str:
        return "l0_coefficient"

    def upgrade_threshold(self) -> Tensor:
        return self.threshold.detach().float()

    def export_config(self) -> dict:
        return {"architecture": "jumprelu"}

    @classmethod
    def export_fields(cls, read) -> tuple[dict, dict]:
        return {}, {"threshold": read.per_latent()}

    def export_tensors(self, scale: float = 1.0) -> dict[str, Tensor]:
        # Thresholds live in pre-activation space, which the scale fold leaves unchanged.
        return {**super().export_tensors(scale), "threshold": self.threshold.detach().float().contiguous()}

    def load_exported(self, tensors: dict[str, Tensor], cfg: dict) -> None:
        super().load_exported(tensors, cfg)
        with torch.no_grad():
            self.log_threshold.copy_(tensors["threshold"].clamp_min(1e-12).log())
