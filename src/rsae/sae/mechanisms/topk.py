"""TopK mechanism: the k largest pre-activations of each token fire (then a ReLU), plus AuxK.

    z_j  = relu(h_j) if h_j is among the k largest of its row, else 0
    AuxK = aux_coefficient * min(n_dead / k_aux, 1) * ||e_hat - (x - x_hat)||^2 / ||x - mean(x)||^2
    e_hat = topk_relu(h restricted to the dead latents, k_aux) @ W_dec

AuxK (Gao et al. 2024): latents that have not fired for `dead_after_tokens` tokens try to
reconstruct the main model's residual (no gradient into x_hat) with their own top-`k_aux`, which
revives them. It is 0 while no latent is dead. The norms are summed over the batch; the variance is
about the batch mean. As a rational SAE's mask: m(h) = [h_j among the k largest and h_j > 0], with
the same AuxK on the raw pre-activations.

AuxK runs outside any compiled graph (its sizes follow the dead count), and over only the dead
latents' own columns when the step planned few of them (`SAE.aux_columns`): the same values, to
rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rsae.errors import require
from rsae.sae.mechanisms.base import Mask


def topk_relu(h: Tensor, k: int) -> Tensor:
    values, indices = torch.topk(h, k, dim=-1, sorted=False)
    return torch.zeros_like(h).scatter_(-1, indices, values.relu())


def topk_mask(h: Tensor, k: int) -> Tensor:
    """[h_j among the k largest of its row and h_j > 0], in h's dtype."""
    idx = torch.topk(h, k, dim=-1, sorted=False).indices
    top = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, idx, True)
    return (top & (h > 0)).to(h.dtype)


def default_k_aux(d_in: int, d_sae: int) -> int:
    return min(d_sae, max(1, d_in // 2))


@torch.compiler.disable  # its sizes follow the dead count: traced, each new count recompiled the step
def auxk_loss(sae, x: Tensor, x_hat: Tensor, h: Tensor, k_aux: int, coefficient: float) -> Tensor:
    """AuxK of an SAE skeleton (`W_enc`, `b_enc`, `W_dec`, `b_dec`, `dead_mask`, `aux_columns`).
    Runs outside any compiled graph (a captured CUDA graph still records it) and returns a tensor,
    so a compiled step's graphs never depend on how many latents are dead."""
    dead = sae.dead_mask()
    capacity = sae.aux_columns()
    if capacity == 0:
        return h.new_zeros((), dtype=torch.float32)
    if capacity < sae.d_sae:  # at most `capacity` latents are dead: only their columns
        e_hat = _dead_columns_reconstruction(sae, x, dead, capacity, k_aux)
    else:  # top-k_aux among dead latents only: live ones are pushed to -inf before selection,
        # and where fewer than k_aux are dead the ReLU zeroes the -inf picks (= top-n_dead)
        z_aux = topk_relu(h.masked_fill(~dead, float("-inf")), k_aux)
        e_hat = (z_aux @ sae.W_dec).float()
    residual = (x - x_hat).detach().float()
    variance = (x.float() - x.float().mean(0)).pow(2).sum().clamp_min(1e-12)
    # Weight min(n_dead / k_aux, 1) with the configured k_aux (Gao et al.): fewer dead latents
    # than k_aux weigh less. A tensor, so the fast path stays free of host syncs.
    weight = (dead.sum(dtype=torch.float32) / k_aux).clamp(max=1.0)
    return coefficient * weight * (e_hat - residual).pow(2).sum() / variance


def _dead_columns_reconstruction(sae, x: Tensor, dead: Tensor, capacity: int, k_aux: int) -> Tensor:
    """AuxK's reconstruction from the top-k_aux dead latents of each row when at most `capacity`
    latents are dead: their pre-activations come from their own columns of W_enc (a [batch,
    capacity] GEMM, not [batch, d_sae]), padded to `capacity` with -inf, and the decoder reads only
    their rows. The same values as over all columns, to rounding."""
    cols, valid = dead_columns(dead, capacity)
    w_enc = sae.W_enc.t()[cols]  # [capacity, d_in] rows of W_enc's memory when it is stored transposed
    h = torch.nn.functional.linear(x - sae.b_dec, w_enc, sae.b_enc[cols])
    return (_aux_codes(h, valid, k_aux) @ sae.W_dec[cols]).float()


def dead_columns(dead: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """(`capacity` latents: the dead ones in order, then padding; which of them are dead). The i-th
    dead latent is where the running count of dead latents first reaches i + 1: a search (no sort,
    no scatter)."""
    running = dead.cumsum(0)
    wanted = torch.arange(1, capacity + 1, device=dead.device)
    cols = torch.searchsorted(running, wanted).clamp_max(dead.shape[0] - 1)
    return cols, wanted <= running[-1]


def _aux_codes(h: Tensor, valid: Tensor, k_aux: int) -> Tensor:
    """AuxK's codes over the columns of h: the top k_aux of each row among the valid (dead)
    columns after the ReLU; all of them where there are no more than k_aux columns."""
    h = h.masked_fill(~valid, float("-inf"))
    return topk_relu(h, k_aux) if h.shape[-1] > k_aux else h.relu()


class TopKMask(Mask):
    """m(h) = [h_j among the owner's k largest and h_j > 0]; AuxK with the owner's coefficients."""

    name = "topk"
    kernel_alone = False

    def check(self, d_sae: int, k: int | None) -> None:
        require(k is not None and 0 < int(k) <= d_sae, f"gate=topk needs k with 0 < k <= d_sae ({d_sae}), got {k}")

    def __call__(self, h: Tensor, owner) -> Tensor:
        return topk_mask(h, owner.k)

    def codes(self, rational_gate, h: Tensor, owner) -> Tensor:
        if h.device.type == "cpu":
            return _gated_codes_uncompiled(rational_gate, h, self(h, owner))
        return super().codes(rational_gate, h, owner)

    def penalises_codes(self, sparsity: str) -> bool:
        return sparsity == "codes"

    def own_magnitudes(self, out) -> None:
        return None  # k is fixed

    def losses(self, owner, x: Tensor, out, step) -> dict[str, Tensor]:
        if not (owner.training and owner.aux_coefficient > 0):
            return {}
        return {"aux": auxk_loss(owner, x, out.x_hat, out.h, owner.k_aux, owner.aux_coefficient)}

    def uses_auxk(self, owner) -> bool:
        return owner.aux_coefficient > 0

    def sparsity_lever(self, sparsity: str) -> None:
        return None  # k fixes L0

    def export_config(self, owner) -> dict:
        return {"k": owner.k}

    def export_fields(self, read) -> tuple[dict, dict]:
        return {"k": read.int("k", 1, read.d_sae)}, {}

    def kwargs_from_export(self, cfg: dict) -> dict:
        return {"k": int(cfg["k"])}


# On the CPU, torch.compile (inductor, torch 2.13) turns the rational gate times this mask into
# all-zero codes in a training graph (trainable gate scales), so the product stays out of compiled
# CPU graphs. A module-level function: nothing on the caller's stack dies between steps. On the
# GPU the gate is an opaque fused operator and compiles correctly.
@torch.compiler.disable
def _gated_codes_uncompiled(rational_gate, h: Tensor, mask: Tensor) -> Tensor:
    return rational_gate(h) * mask
