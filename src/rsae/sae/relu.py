"""ReLU SAE: the skeleton plus the ReLU mechanism (`rsae.sae.mechanisms.relu`).

    z = relu(h),   loss = mse + l1_coefficient * w(step) * mean_rows sum_j |z_j| ||W_dec_j||
"""

from __future__ import annotations

from torch import Tensor

from rsae.sae.base import SAE, SAEOutput, require
from rsae.sae.mechanisms.relu import linear_warmup, relu, weighted_l1

__all__ = ["ReLUSAE", "linear_warmup"]


class ReLUSAE(SAE):
    architecture = "standard"  # SAELens's name for the ReLU SAE
    aliases = ("relu",)
    mechanism = "relu"

    def __init__(self, d_in: int, d_sae: int | None = None, l1_coefficient: float = 5.0, l1_warmup_steps: int = 0, **kw) -> None:
        require(l1_coefficient >= 0, f"l1_coefficient must be >= 0, got {l1_coefficient}")
        require(l1_warmup_steps >= 0, f"l1_warmup_steps must be >= 0, got {l1_warmup_steps}")
        super().__init__(d_in, d_sae, **kw)
        self.l1_coefficient = l1_coefficient
        self.l1_warmup_steps = l1_warmup_steps

    def activation(self, h: Tensor) -> Tensor:
        return relu(h)

    def aux_losses(self, x: Tensor, out: SAEOutput, step: int) -> dict[str, Tensor]:
        coef = self.l1_coefficient * linear_warmup(step, self.l1_warmup_steps)
        return {"l1": coef * weighted_l1(out.z.float().abs(), self.decoder_norms())}

    def sparsity_lever(self) -> str:
        return "l1_coefficient"
