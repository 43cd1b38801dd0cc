"""TopK SAE: keep the k largest pre-activations per token (then ReLU), with the AuxK loss.

AuxK (Gao et al. 2024): latents that have not fired for `dead_after_tokens` tokens try to
reconstruct the main model's residual with their own top-`k_aux`, weighted by `aux_coefficient`
and normalised by the input variance, which revives dead latents.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rsae.sae.base import SAE, SAEOutput, require, resolve_d_sae


def topk_relu(h: Tensor, k: int) -> Tensor:
    values, indices = torch.topk(h, k, dim=-1, sorted=False)
    return torch.zeros_like(h).scatter_(-1, indices, values.relu())


class TopKSAE(SAE):
    architecture = "topk"

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
        self.k_aux = k_aux if k_aux is not None else min(d_sae, max(1, d_in // 2))

    def activation(self, h: Tensor) -> Tensor:
        return topk_relu(h, self.k)

    def aux_losses(self, x: Tensor, out: SAEOutput, step: int) -> dict[str, Tensor]:
        if not self.training or self.aux_coefficient == 0:
            return {}
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return {"aux": out.h.new_zeros((), dtype=torch.float32)}
        k_aux = min(self.k_aux, n_dead)
        # Top-k_aux among dead latents only: live ones are pushed to -inf before selection.
        h_dead = out.h.masked_fill(~dead, float("-inf"))
        z_aux = topk_relu(h_dead, k_aux)
        residual = (x - out.x_hat).detach().float()
        e_hat = (z_aux @ self.W_dec).float()
        variance = (x.float() - x.float().mean(0)).pow(2).sum().clamp_min(1e-12)
        scale = min(n_dead / k_aux, 1.0)
        return {"aux": self.aux_coefficient * scale * (e_hat - residual).pow(2).sum() / variance}

    def export_config(self) -> dict:
        return {"architecture": "topk", "k": self.k}
