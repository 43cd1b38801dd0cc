"""BatchTopK SAE: the skeleton plus the BatchTopK mechanism (`rsae.sae.mechanisms.batchtopk`):
keep the k*B largest activations over the whole batch during training; at inference a single
global threshold (an EMA of the smallest activation kept in each training batch), so the exported
SAE is a JumpReLU with that threshold on every latent. AuxK as TopK's.

The training step is TopK's fast step with the batch selection (`rsae.sae.fast_step.BatchTopKFastStep`:
encoder without input gradient, sparse decoding of the kept entries, grouped by token); the
threshold update runs on the device without host waits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rsae.sae.base import require
from rsae.sae.fast_step import BatchTopKFastStep
from rsae.sae.mechanisms.batchtopk import batch_topk, threshold_codes, update_threshold
from rsae.sae.topk import TopKSAE


class BatchTopKSAE(BatchTopKFastStep, TopKSAE):
    architecture = "batchtopk"
    mechanism = "batchtopk"

    def __init__(self, d_in: int, d_sae: int | None = None, k: int = 32, threshold_ema: float = 0.01, **kw) -> None:
        require(0 < threshold_ema <= 1, f"threshold_ema must be in (0, 1], got {threshold_ema}")
        super().__init__(d_in, d_sae, k=k, **kw)
        self.threshold_ema = threshold_ema
        self.register_buffer("inference_threshold", torch.zeros(()))
        self.register_buffer("threshold_initialised", torch.zeros((), dtype=torch.bool))

    def activation(self, h: Tensor) -> Tensor:
        if not self.training:
            return threshold_codes(h, self.inference_threshold)
        z, kept = batch_topk(h, self.k)
        self._update_threshold(kept)
        return z

    def _update_threshold(self, kept: Tensor) -> None:
        """EMA of the smallest positive kept activation (batches without one leave it unchanged)."""
        update_threshold(self.inference_threshold, self.threshold_initialised, kept, self.threshold_ema)

    def upgrade_threshold(self) -> Tensor:
        return self.inference_threshold.detach().float().expand(self.d_sae).clone()

    def export_config(self) -> dict:
        # SAELens loads it as a JumpReLU; `rsae_architecture` lets rsae restore the BatchTopK.
        return {"architecture": "jumprelu", "rsae_architecture": "batchtopk", "k": self.k}

    @classmethod
    def export_fields(cls, read) -> tuple[dict, dict]:
        return {"k": read.int("k", 1, read.d_sae)}, {"threshold": read.per_latent()}

    def export_tensors(self, scale: float = 1.0) -> dict[str, Tensor]:
        thr = self.inference_threshold.detach().float().expand(self.d_sae).contiguous()
        return {**super().export_tensors(scale), "threshold": thr}

    def load_exported(self, tensors: dict[str, Tensor], cfg: dict) -> None:
        super().load_exported(tensors, cfg)
        with torch.no_grad():
            self.inference_threshold.copy_(tensors["threshold"].float().mean())
            self.threshold_initialised.fill_(True)
