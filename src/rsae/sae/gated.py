"""Gated SAE (Rajamanoharan et al. 2024): a gate path decides which latents fire, a magnitude path
sharing its encoder (rescaled per latent) how much.

    u        = W_enc^T (x - b_dec)
    pi_gate  = u + b_gate,              pi_mag = exp(r_mag) * u + b_mag
    z        = 1[pi_gate > 0] * relu(pi_mag),       x_hat = W_dec^T z + b_dec
    loss     = mse + l1_coefficient * w(step) * mean_rows sum_j relu(pi_gate)_j ||W_dec_j||
                   + aux_coefficient * mean_rows ||x - (sg(W_dec)^T relu(pi_gate) + sg(b_dec))||^2

The step 1[.] passes no gradient, so the gate path learns only from the L1 and the auxiliary
reconstruction (whose decoder is frozen: sg = stop-gradient, as in the paper; SAELens's `gated`
training does not detach it). w(step) is the ReLU mechanism's linear warm-up.

One pre-activation per latent: pi_mag - b_mag = exp(r_mag) (pi_gate - b_gate), so
pi_gate > 0  <=>  pi_mag > theta_j = b_mag_j - exp(r_mag_j) b_gate_j, and
z = relu(pi_mag) * 1[pi_mag > theta]: at inference a JumpReLU on h = pi_mag with threshold
max(theta_j, 0). That is the skeleton's h here (`pre_acts`), the form the upgrade copies
(`skeleton_weights`) and the thresholds its jumprelu mask keeps (`upgrade_threshold`).

Export: SAELens's `gated` (W_enc, W_dec, b_dec, b_gate, b_mag, r_mag; no b_enc).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rsae.sae import fast
from rsae.sae.base import SAE, SAEOutput, require
from rsae.sae.mechanisms.relu import linear_warmup, weighted_l1

GATED_TENSORS = ("b_gate", "b_mag", "r_mag")


class GatedSAE(SAE):
    architecture = "gated"  # SAELens's name
    mechanism = "gated"  # an upgrade teacher through its JumpReLU form (upgrade_threshold)
    export_skeleton = ("W_enc", "W_dec", "b_dec")  # no b_enc: b_gate and b_mag take its place

    def __init__(self, d_in: int, d_sae: int | None = None, l1_coefficient: float = 5.0, l1_warmup_steps: int = 0,
                 aux_coefficient: float = 1.0, **kw) -> None:
        require(l1_coefficient >= 0, f"l1_coefficient must be >= 0, got {l1_coefficient}")
        require(l1_warmup_steps >= 0, f"l1_warmup_steps must be >= 0, got {l1_warmup_steps}")
        require(aux_coefficient >= 0, f"aux_coefficient must be >= 0, got {aux_coefficient}")
        super().__init__(d_in, d_sae, **kw)
        del self.b_enc  # the skeleton's bias: b_gate and b_mag here
        self.b_gate = nn.Parameter(torch.zeros(self.d_sae))  # zeros, as SAELens initialises them
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))
        self.l1_coefficient, self.l1_warmup_steps = l1_coefficient, l1_warmup_steps
        self.aux_coefficient = aux_coefficient

    # --- the two paths ------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """pi_mag = exp(r_mag) * W_enc^T (x - b_dec) + b_mag (the skeleton's h)."""
        w_mag = self.W_enc * self.r_mag.exp()
        if fast.enabled():
            return fast.linear_encoder(x, w_mag, self.b_mag, self.b_dec)
        return (x - self.b_dec) @ w_mag + self.b_mag

    def gate_pre_acts(self, x: Tensor) -> Tensor:
        """pi_gate = W_enc^T (x - b_dec) + b_gate."""
        if fast.enabled():
            return fast.linear_encoder(x, self.W_enc, self.b_gate, self.b_dec)
        return (x - self.b_dec) @ self.W_enc + self.b_gate

    def gate_threshold(self) -> Tensor:
        """theta_j with pi_gate_j > 0 <=> pi_mag_j > theta_j."""
        return (self.b_mag - self.r_mag.exp() * self.b_gate).detach()

    def activation(self, h: Tensor) -> Tensor:
        # (the comparison promotes a bf16 h to the thresholds' float32, not the thresholds to bf16)
        return torch.relu(h) * (h > self.gate_threshold()).to(h.dtype)

    def aux_losses(self, x: Tensor, out: SAEOutput, step: int) -> dict[str, Tensor]:
        gate = torch.relu(self.gate_pre_acts(x))
        coef = self.l1_coefficient * linear_warmup(step, self.l1_warmup_steps)
        via_gate = gate @ self.W_dec.detach() + self.b_dec.detach()
        return {"l1": coef * weighted_l1(gate.float(), self.decoder_norms()),
                "aux_recon": self.aux_coefficient * (via_gate.float() - x.float()).pow(2).sum(-1).mean()}

    # --- what the jobs ask --------------------------------------------------------------------
    def sparsity_lever(self) -> str:
        return "l1_coefficient"

    def skeleton_weights(self) -> dict[str, Tensor]:
        return {"W_enc": (self.W_enc * self.r_mag.exp()).detach(), "b_enc": self.b_mag.detach(),
                "W_dec": self.W_dec.detach(), "b_dec": self.b_dec.detach()}

    def upgrade_threshold(self) -> Tensor:
        return self.gate_threshold().float().clamp_min(0)

    # --- export -------------------------------------------------------------------------------
    def export_config(self) -> dict:
        return {"architecture": "gated"}

    @classmethod
    def export_fields(cls, read) -> tuple[dict, dict]:
        return {}, {name: read.per_latent() for name in GATED_TENSORS}

    def export_tensors(self, scale: float = 1.0) -> dict[str, Tensor]:
        # u scales with W_enc; b_gate, b_mag, r_mag live in pre-activation space, unchanged by the fold.
        return {**super().export_tensors(scale), **{name: getattr(self, name).detach().float().contiguous() for name in GATED_TENSORS}}

    @classmethod
    def centre_input(cls, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        shift = tensors["b_dec"] @ tensors["W_enc"]  # x W = (x - b_dec) W + b_dec W, on both paths
        return {**tensors, "b_gate": tensors["b_gate"] + shift, "b_mag": tensors["b_mag"] + shift * tensors["r_mag"].exp()}

    def load_exported(self, tensors: dict[str, Tensor], cfg: dict) -> None:
        with torch.no_grad():
            for name in (*self.export_skeleton, *GATED_TENSORS):
                require(name in tensors, f"gated SAE weights lack tensor {name!r}")
                t, p = tensors[name], getattr(self, name)
                require(t.shape == p.shape, f"{name}: expected shape {list(p.shape)}, got {list(t.shape)}")
                p.copy_(t)
