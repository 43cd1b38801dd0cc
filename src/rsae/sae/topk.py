"""TopK SAE: the skeleton plus the TopK mechanism (`rsae.sae.mechanisms.topk`): keep the k largest
pre-activations per token (then ReLU), with the AuxK loss that revives dead latents.

Its one fast override, `training_output` (the sparse step of Triton kernels from d_sae / k >=
SPARSE_STEP_RATIO on CUDA, sparse decoding from SPARSE_DECODE_RATIO, AuxK over the dead latents'
own columns, no host waits), is `rsae.sae.fast_step.TopKFastStep`; the thresholds below decide
when its sparse paths apply.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from rsae.sae import fast, sparse_step
from rsae.sae.base import SAE, SAEOutput, require, resolve_d_sae
from rsae.sae.fast_step import TopKFastStep
from rsae.sae.mechanisms.topk import auxk_loss, default_k_aux, topk_relu

# Decode sparsely when k * ratio <= d_sae, the ratio by device type. CUDA, measured on an H200
# (bf16, k = 32, batch 4096): the sparse decoder (embedding_bag forward and backward) cost 0.86 ms
# against 0.55 ms for the three dense GEMMs at 768 x 24576 (d_sae / k = 768), and 2.9 against
# 4.4 ms at 2304 x 65536 (d_sae / k = 2048): even at d_sae / k of about 1200-1400, so sparse from
# 1280 on. Other devices (not measured): a gathered row taken as costing 64 columns of a GEMM.
SPARSE_DECODE_RATIO = {"cuda": 1280, "other": 128}
# The sparse step of Triton kernels (`rsae.sae.sparse_step`, CUDA) from k * ratio <= d_sae on.
# Measured on an H200 at 768 x 24576, compiled + CUDA graph, sparse against dense: 1.73 / 2.86 ms
# at k = 32 (d_sae / k = 768), 2.58 / 2.92 at k = 128 (192), 4.08 / 3.38 at k = 256 (96); the
# crossover near 150. RSAE_SPARSE_STEP_RATIO overrides it (benchmarks: 1 always, a huge value never).
SPARSE_STEP_RATIO = int(os.environ.get("RSAE_SPARSE_STEP_RATIO", 150))


class TopKSAE(TopKFastStep, SAE):
    architecture = "topk"
    mechanism = "topk"

    def __init__(
        self,
        d_in: int,
        d_sae: int | None = None,
        k: int = 32,
        aux_coefficient: float = 1 / 32,
        k_aux: int | None = None,
        **kw,
    ) -> None:
        require(isinstance(d_in, int) and d_in >= 1, f"d_in must be a positive integer, got {d_in!r}")
        d_sae = resolve_d_sae(d_in, d_sae, kw.pop("expansion_factor", None))
        require(d_sae >= 1, f"d_sae must be >= 1, got {d_sae}")
        require(0 < k <= d_sae, f"k must satisfy 0 < k <= d_sae ({d_sae}), got {k}")
        require(aux_coefficient >= 0, f"aux_coefficient must be >= 0, got {aux_coefficient}")
        require(k_aux is None or 0 < k_aux <= d_sae, f"k_aux must satisfy 0 < k_aux <= d_sae, got {k_aux}")
        super().__init__(d_in, d_sae, **kw)
        self.k = k
        self.aux_coefficient = aux_coefficient
        self.k_aux = k_aux if k_aux is not None else default_k_aux(d_in, d_sae)
        self._dead_count = fast.AsyncCount()

    def activation(self, h: Tensor) -> Tensor:
        return topk_relu(h, self.k)

    def uses_auxk(self) -> bool:
        return self.aux_coefficient > 0

    def _kernels_apply(self, x: Tensor) -> bool:
        """The kernels of `rsae.sae.sparse_step` run here, k is small next to d_sae, and deterministic
        algorithms are not asked for (the weight gradients add some rows atomically)."""
        return (sparse_step.applies(x) and x.dim() == 2 and self.k * SPARSE_STEP_RATIO <= self.d_sae
                and not torch.are_deterministic_algorithms_enabled())

    def _decode_sparsely(self, per_row: int) -> bool:
        device = self.W_dec.device.type
        return per_row * SPARSE_DECODE_RATIO.get(device, SPARSE_DECODE_RATIO["other"]) <= self.d_sae

    # --- AuxK ---------------------------------------------------------------------------------------
    def aux_losses(self, x: Tensor, out: SAEOutput, step: int) -> dict[str, Tensor]:
        if not self.training or self.aux_coefficient == 0:
            return {}
        return {"aux": auxk_loss(self, x, out.x_hat, out.h, self.k_aux, self.aux_coefficient)}

    def export_config(self) -> dict:
        return {"architecture": "topk", "k": self.k}

    @classmethod
    def export_fields(cls, read) -> tuple[dict, dict]:
        k = read.int("k", 1, read.d_sae)
        if read.bool("rescale_acts_by_decoder_norm", default=False):
            read.refuse("rescale_acts_by_decoder_norm=true is not supported")
        return {"k": k}, {}

    @classmethod
    def kwargs_from_export(cls, cfg: dict) -> dict:
        return {"k": int(cfg["k"])} if "k" in cfg else {}
