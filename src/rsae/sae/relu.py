"""ReLU SAE: z = ReLU(h), L1 penalty weighted by decoder row norms, linearly warmed up."""

from __future__ import annotations

import torch
from torch import Tensor

from rsae.sae.base import SAE, SAEOutput, require


def linear_warmup(step: int | Tensor, warmup_steps: int) -> float | Tensor:
    """min(1, (step + 1) / warmup_steps); a tensor for a tensor step (a compiled step takes the
    step number as a tensor, so that a new number neither recompiles nor re-records CUDA graphs)."""
    if warmup_steps <= 0:
        return 1.0
    if isinstance(step, Tensor):
        return ((step + 1) / warmup_steps).clamp(max=1.0)
    return min(1.0, (step + 1) / warmup_steps)


class ReLUSAE(SAE):
    architecture = "standard"  # SAELens's name for the ReLU SAE

    def __init__(self, d_in: int, d_sae: int | None = None, l1_coefficient: float = 5.0, l1_warmup_steps: int = 0, **kw) -> None:
        require(l1_coefficient >= 0, f"l1_coefficient must be >= 0, got {l1_coefficient}")
        require(l1_warmup_steps >= 0, f"l1_warmup_steps must be >= 0, got {l1_warmup_steps}")
        super().__init__(d_in, d_sae, **kw)
        self.l1_coefficient = l1_coefficient
        self.l1_warmup_steps = l1_warmup_steps

    def activation(self, h: Tensor) -> Tensor:
        return torch.relu(h)

    def aux_losses(self, x: Tensor, out: SAEOutput, step: int) -> dict[str, Tensor]:
        coef = self.l1_coefficient * linear_warmup(step, self.l1_warmup_steps)
        l1 = (out.z.float().abs() * self.decoder_norms().float()).sum(-1).mean()
        return {"l1": coef * l1}
