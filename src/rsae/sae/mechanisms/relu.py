"""ReLU mechanism: the codes fire where h > 0; sparsity from an L1 penalty, linearly warmed up.

    z  = relu(h)
    L1 = l1_coefficient * w(step) * mean over rows of sum_j m_j ||W_dec_j||,   m = |z|
    w(step) = min(1, (step + 1) / l1_warmup_steps)

Weighting by the decoder row norms keeps the penalty from being dodged by shrinking z and growing
W_dec. As a rational SAE's mask: m(h) = [h > 0], and under `sparsity: mask` the L1 term is on
relu(h) (an L1 on |z| can be met by shrinking the rational while the same latents fire).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rsae.sae.mechanisms.base import Mask


def linear_warmup(step: int | Tensor, warmup_steps: int) -> float | Tensor:
    """min(1, (step + 1) / warmup_steps); a tensor for a tensor step (a compiled step takes the
    step number as a tensor, so that a new number neither recompiles nor re-records CUDA graphs)."""
    if warmup_steps <= 0:
        return 1.0
    if isinstance(step, Tensor):
        return ((step + 1) / warmup_steps).clamp(max=1.0)
    return min(1.0, (step + 1) / warmup_steps)


def relu(h: Tensor) -> Tensor:
    return torch.relu(h)


def weighted_l1(magnitudes: Tensor, decoder_norms: Tensor) -> Tensor:
    """Mean over rows of sum_j m_j ||W_dec_j|| (magnitudes [B, d_sae], float32)."""
    return (magnitudes * decoder_norms.float()).sum(-1).mean()


def weighted_abs_sum(abs_sums: Tensor, decoder_norms: Tensor) -> Tensor:
    """sum_j ||W_dec_j|| sum_rows |z_j| from the column sums of |z| over the batch (a kernel that
    forms them in its own pass): divided by the rows, `weighted_l1` of |z|."""
    return (abs_sums * decoder_norms.float()).sum()


class ReLUMask(Mask):
    """m(h) = [h > 0]."""

    name = "relu"
    positive_only = True

    def __call__(self, h: Tensor, owner) -> Tensor:
        return (h > 0).to(h.dtype)

    def penalises_codes(self, sparsity: str) -> bool:
        return sparsity == "codes"

    def own_magnitudes(self, out) -> Tensor:
        return torch.relu(out.h.float())
