"""BatchTopK mechanism: the k * B largest activations of a batch of B tokens fire in training; one
global threshold at inference.

    training:   z = relu(h) on the k * B largest entries of relu(h) over the whole batch, else 0
    inference:  z = h * [h > tau]
    tau <- lerp(tau, min kept positive activation of the batch, threshold_ema)   (the first batch sets it)

At inference a token's codes must not depend on its batch-mates, hence tau; an SAE with it is a
JumpReLU with tau on every latent. AuxK as TopK's (`rsae.sae.mechanisms.topk`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def batch_topk(h: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(codes z, the kept values): the k * B largest entries of relu(h) over the batch."""
    flat = h.relu().flatten()
    values, indices = torch.topk(flat, min(k * h.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter_(0, indices, values).view_as(h), values


def batch_topk_entries(h: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`batch_topk` as entries sorted by position, so that each token's entries are contiguous:
    (values, latent indices, each token's first entry, dense codes)."""
    n, m = h.shape
    flat = h.relu().flatten()
    with torch.no_grad():
        kept = torch.topk(flat.detach(), min(k * n, flat.numel()), sorted=False).indices
        kept = kept.sort().values
        rows = torch.div(kept, m, rounding_mode="floor")
        offsets = torch.searchsorted(rows, torch.arange(n, device=h.device, dtype=rows.dtype))
    values = flat.gather(0, kept)
    z = torch.zeros_like(flat).scatter(0, kept, values).view(n, m)
    return values, kept - rows * m, offsets, z


def threshold_codes(h: Tensor, threshold: Tensor) -> Tensor:
    """Inference: z = h * [h > tau]."""
    return h * (h > threshold.to(h.dtype))


@torch.no_grad()
def update_threshold(threshold: Tensor, initialised: Tensor, kept: Tensor, ema: float) -> None:
    """tau <- EMA of the smallest positive kept activation, in place on the device (batches without
    one leave it unchanged; the first batch with one sets it)."""
    kept = kept.float()
    positive = kept > 0
    batch_min = torch.where(positive, kept, torch.full_like(kept, float("inf"))).amin()
    updated = torch.where(initialised, torch.lerp(threshold, batch_min, ema), batch_min)
    any_positive = positive.any()
    threshold.copy_(torch.where(any_positive, updated, threshold))
    initialised.logical_or_(any_positive)
