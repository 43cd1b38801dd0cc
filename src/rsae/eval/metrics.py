"""Reconstruction and sparsity metrics, one definition each (docs/design.md, section 2).

Over N evaluation tokens x (d dims), reconstructions x_hat, codes z:
  mse          mean over tokens of sum_d (x - x_hat)^2      (mse_per_dim = mse / d)
  fvu          sum ||x - x_hat||^2 / sum ||x - mean(x)||^2  (mean over the evaluation set)
  explained_variance = 1 - fvu
  l0           mean count of non-zero codes per token
  alive        fraction of latents non-zero on at least one token
  dense        fraction of latents non-zero on more than 10% of tokens
  l2_ratio     mean over tokens with x != 0 of ||x_hat|| / ||x||
Sums are accumulated in float64 so the variance about the mean does not cancel catastrophically.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

DENSE_FRACTION = 0.1


class ReconstructionMetrics(Metric):
    full_state_update = False

    def __init__(self, d_in: int, d_sae: int, l0_tolerances: tuple[float, ...] = (), **kw) -> None:
        super().__init__(**kw)
        self.d_in, self.d_sae = d_in, d_sae
        self.l0_tolerances = tuple(l0_tolerances)
        f64 = dict(dtype=torch.float64)
        self.add_state("n", torch.zeros((), **f64), dist_reduce_fx="sum")
        self.add_state("sq_err", torch.zeros((), **f64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, **f64), dist_reduce_fx="sum")
        self.add_state("sum_sq_x", torch.zeros((), **f64), dist_reduce_fx="sum")
        self.add_state("nonzero", torch.zeros((), **f64), dist_reduce_fx="sum")
        self.add_state("fires", torch.zeros(d_sae, **f64), dist_reduce_fx="sum")
        self.add_state("norm_ratio", torch.zeros((), **f64), dist_reduce_fx="sum")
        self.add_state("n_nonzero_x", torch.zeros((), **f64), dist_reduce_fx="sum")
        self.add_state("above_tol", torch.zeros(len(self.l0_tolerances), **f64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor, z: Tensor) -> None:
        x, x_hat = x.detach().double(), x_hat.detach().double()
        active = z.detach() != 0
        self.n += x.shape[0]
        self.sq_err += (x - x_hat).pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_sq_x += x.pow(2).sum()
        self.nonzero += active.sum()
        self.fires += active.sum(0)
        x_norm = x.norm(dim=-1)
        has_norm = x_norm > 0  # a zero input has no defined shrinkage ratio
        self.norm_ratio += (x_hat.norm(dim=-1)[has_norm] / x_norm[has_norm]).sum()
        self.n_nonzero_x += has_norm.sum()
        if self.l0_tolerances:
            mags = z.detach().abs().double()
            for i, tol in enumerate(self.l0_tolerances):
                self.above_tol[i] += (mags > tol).sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.n.clamp_min(1)
        d = self.d_in
        total_var = self.sum_sq_x - self.sum_x.pow(2).sum() / n
        fvu = self.sq_err / total_var.clamp_min(1e-30)
        out = {
            "mse": self.sq_err / n,
            "mse_per_dim": self.sq_err / n / d,
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "l0": self.nonzero / n,
            "alive": (self.fires > 0).double().mean(),
            "dense": (self.fires > DENSE_FRACTION * n).double().mean(),
            "l2_ratio": self.norm_ratio / self.n_nonzero_x.clamp_min(1),
        }
        for i, tol in enumerate(self.l0_tolerances):
            out[f"l0_tol_{tol:g}"] = self.above_tol[i] / n
        return {k: v.float() for k, v in out.items()}


def feature_recovery(true_features: Tensor, decoder_rows: Tensor, threshold: float = 0.9) -> dict[str, float]:
    """Synthetic ground truth: mean over true features of the best cosine with any decoder row,
    and the fraction of true features whose best cosine exceeds `threshold`."""
    t = torch.nn.functional.normalize(true_features.double(), dim=-1)
    w = torch.nn.functional.normalize(decoder_rows.detach().double().to(t.device), dim=-1)
    best = (t @ w.T).max(dim=1).values
    return {"mmcs": float(best.mean()), "recovered": float((best > threshold).double().mean())}
