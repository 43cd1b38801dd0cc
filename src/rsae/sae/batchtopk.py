"""BatchTopK SAE: keep the k*B largest activations over the whole batch during training.

At inference a single global threshold replaces the batch selection (so a token's codes do not
depend on its batch-mates): an EMA of the smallest activation kept in each training batch. The
exported SAE is therefore a JumpReLU with that threshold on every latent.

The training step is TopKSAE's (encoder without input gradient, sparse decoding of the kept
entries, grouped by token); the threshold update runs on the device without host waits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rsae.sae.base import require
from rsae.sae.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"

    def __init__(self, d_in: int, d_sae: int | None = None, k: int = 32, threshold_ema: float = 0.01, **kw) -> None:
        require(0 < threshold_ema <= 1, f"threshold_ema must be in (0, 1], got {threshold_ema}")
        super().__init__(d_in, d_sae, k=k, **kw)
        self.threshold_ema = threshold_ema
        self.register_buffer("inference_threshold", torch.zeros(()))
        self.register_buffer("threshold_initialised", torch.zeros((), dtype=torch.bool))

    def activation(self, h: Tensor) -> Tensor:
        if not self.training:
            return h * (h > self.inference_threshold.to(h.dtype))
        acts = h.relu()
        flat = acts.flatten()
        values, indices = torch.topk(flat, min(self.k * h.shape[0], flat.numel()), sorted=False)
        self._update_threshold(values)
        return torch.zeros_like(flat).scatter_(0, indices, values).view_as(h)

    def _fast_path(self) -> bool:
        # In eval mode the codes come from the global threshold (`activation`), not a batch top-k.
        return super()._fast_path() and self.training

    def _kernels_apply(self, x: Tensor) -> bool:  # its rows keep varying numbers of entries
        return False

    def _select(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """The k*B largest ReLU'd entries of the batch, sorted by position so that each token's
        entries are contiguous: (values, latent indices, each token's first entry, dense codes)."""
        n, m = h.shape
        flat = h.relu().flatten()
        with torch.no_grad():
            kept = torch.topk(flat.detach(), min(self.k * n, flat.numel()), sorted=False).indices
            kept = kept.sort().values
            rows = torch.div(kept, m, rounding_mode="floor")
            offsets = torch.searchsorted(rows, torch.arange(n, device=h.device, dtype=rows.dtype))
        values = flat.gather(0, kept)
        if self.training:
            self._update_threshold(values.detach())
        z = torch.zeros_like(flat).scatter(0, kept, values).view(n, m)
        return values, kept - rows * m, offsets, z

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        """EMA of the smallest positive kept activation (batches without one leave it unchanged)."""
        kept = kept.float()
        positive = kept > 0
        batch_min = torch.where(positive, kept, torch.full_like(kept, float("inf"))).amin()
        updated = torch.where(self.threshold_initialised,
                              torch.lerp(self.inference_threshold, batch_min, self.threshold_ema), batch_min)
        any_positive = positive.any()
        self.inference_threshold.copy_(torch.where(any_positive, updated, self.inference_threshold))
        self.threshold_initialised.logical_or_(any_positive)

    def export_config(self) -> dict:
        # SAELens loads it as a JumpReLU; `rsae_architecture` lets rsae restore the BatchTopK.
        return {"architecture": "jumprelu", "rsae_architecture": "batchtopk", "k": self.k}

    def export_tensors(self, scale: float = 1.0) -> dict[str, Tensor]:
        thr = self.inference_threshold.detach().float().expand(self.d_sae).contiguous()
        return {**super().export_tensors(scale), "threshold": thr}

    def load_exported(self, tensors: dict[str, Tensor], cfg: dict) -> None:
        super().load_exported(tensors, cfg)
        with torch.no_grad():
            self.inference_threshold.copy_(tensors["threshold"].float().mean())
            self.threshold_initialised.fill_(True)
