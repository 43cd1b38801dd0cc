"""JumpReLU mechanism: a learned threshold per latent and a straight-through L0.

    z  = h * H(h - theta),   theta_j = exp(log_threshold_j)
    L0 = mean over rows of sum_j H(h_j - theta_j)

H has zero gradient almost everywhere, so theta learns through a straight-through estimator with
a rectangle kernel K(u) = [|u| < 1/2] of width eps = `bandwidth` (Rajamanoharan et al. 2024):

    d H(h - theta) / d theta      := -K((h - theta) / eps) / eps
    d [h H(h - theta)] / d theta  := -theta / eps * K((h - theta) / eps)
    d [h H(h - theta)] / d h      := H(h - theta)

The thresholds' gradient reaches them through the codes and through the L0 count; h gets none
through the count. As a rational SAE's mask: m(h) = H(h - theta) with the same estimator, and the
same L0 term (`l0_coefficient`) decides which latents fire.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rsae.rational.gate import exact_log
from rsae.errors import require
from rsae.sae.mechanisms.base import Mask, switched_on
from rsae.sae.mechanisms.relu import linear_warmup


def rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class Step(torch.autograd.Function):
    """H(h - theta) with the rectangle-kernel pseudo-derivative for theta (none for h)."""

    @staticmethod
    def forward(ctx, h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return (h > threshold).to(h.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        g_theta = -(grad * rectangle((h - threshold) / eps) / eps).sum(0)
        return None, g_theta.to(threshold.dtype), None


class L0(torch.autograd.Function):
    """Mean over tokens of sum_j H(h_j - theta_j), counted in float32, with Step's pseudo-derivative
    for theta. The same function and gradient as `Step.apply(h.float(), theta.float(), eps)
    .sum(-1).mean()`, without materialising h in float32 (the comparison promotes on the fly)."""

    @staticmethod
    def forward(ctx, h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return (h > threshold).sum(-1, dtype=torch.float32).mean()

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        n_tokens = h.numel() // max(1, h.shape[-1])
        kernel = rectangle((h - threshold) / eps).sum(0, dtype=torch.float32)
        return None, (-(grad / n_tokens) * kernel / eps).to(threshold.dtype), None


class JumpReLU(torch.autograd.Function):
    """h * H(h - theta): gradient H(h - theta) for h, -theta/eps * K for theta."""

    @staticmethod
    def forward(ctx, h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return h * (h > threshold).to(h.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        g_h = grad * (h > threshold).to(grad.dtype)
        g_theta = -(grad * threshold / eps * rectangle((h - threshold) / eps)).sum(0)
        return g_h, g_theta.to(threshold.dtype), None


def jumprelu(h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """z = h * H(h - theta)."""
    return JumpReLU.apply(h, threshold.to(h.dtype), bandwidth)


def step_l0(h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """The L0 count in float32 (the reference: h is copied to float32)."""
    return Step.apply(h.float(), threshold.float(), bandwidth).sum(-1).mean()


def threshold_parameter(d_sae: int, init_threshold: float) -> nn.Parameter:
    """log(theta), every latent at `init_threshold`."""
    return nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))


class JumpReLUMask(Mask):
    """m(h) = H(h - theta), the owner's `threshold` and `bandwidth`; L0 term on the thresholds."""

    name = "jumprelu"
    kernel_alone = False

    def add_state(self, owner, init_threshold: float) -> None:
        owner.log_threshold = threshold_parameter(owner.d_sae, init_threshold)

    def __call__(self, h: Tensor, owner) -> Tensor:
        return Step.apply(h, owner.threshold.to(h.dtype), owner.bandwidth)

    def penalises_codes(self, sparsity: str) -> bool:
        return sparsity == "codes"

    def own_magnitudes(self, out) -> None:
        return None  # the L0 term on the thresholds decides L0

    def losses(self, owner, x: Tensor, out, step) -> dict[str, Tensor]:
        if not switched_on(owner.l0_coefficient):
            return {}
        coef = owner.l0_coefficient * linear_warmup(step, owner.l0_warmup_steps)
        return {"l0": coef * step_l0(out.h, owner.threshold, owner.bandwidth)}

    def sparsity_lever(self, sparsity: str) -> str:
        return "l0_coefficient" if sparsity == "mask" else "l1_coefficient"

    def export_config(self, owner) -> dict:
        return {"bandwidth": owner.bandwidth}

    def export_tensors(self, owner) -> dict[str, Tensor]:
        return {"threshold": owner.threshold.detach().float().contiguous()}

    def load_exported(self, owner, tensors: dict[str, Tensor]) -> None:
        require("threshold" in tensors, "rational SAE with gate=jumprelu lacks tensor 'threshold'")
        with torch.no_grad():
            owner.log_threshold.copy_(exact_log(tensors["threshold"].float().clamp_min(1e-12)))

    def export_fields(self, read) -> tuple[dict, dict]:
        return {"bandwidth": read.number("bandwidth", default=0.05)}, {"threshold": read.per_latent()}

    def kwargs_from_export(self, cfg: dict) -> dict:
        return {"bandwidth": float(cfg.get("bandwidth", 0.05))}

    def copy_from_teacher(self, owner, teacher, threshold: Tensor | None) -> None:
        if threshold is None:
            return
        with torch.no_grad():
            if isinstance(getattr(teacher, "log_threshold", None), Tensor):  # a JumpReLU: bit-identical thresholds
                owner.log_threshold.copy_(teacher.log_threshold)
            else:
                owner.log_threshold.copy_(exact_log(threshold.clamp_min(1e-12)))
