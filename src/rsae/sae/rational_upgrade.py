"""The upgrade of a trained teacher into a rational SAE (docs/design.md, section 1): RSAE-init.

`RationalSAE.from_teacher(teacher)` copies the encoder/decoder exactly and sets the mask that
reproduces the teacher's mechanism (`SAE.mechanism`; a teacher with per-latent inference
thresholds, JumpReLU, BatchTopK or Gated, gets the jumprelu mask with those thresholds) and a fitted
table; the encoder copied is the teacher's skeleton form (`SAE.skeleton_weights`: the Gated SAE's
magnitude path);
`calibrate(h, z_teacher)` then fits (a, b, C_in, C_out) on the teacher's real pre-activations with
everything else frozen. `RationalSAE` takes these methods from `FromTeacher`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from rsae.rational.calibrate import calibrate_gate, relative_l2
from rsae.rational.coefficients import available_tables, load_table
from rsae.sae.base import SAE, ConfigError, require
from rsae.sae.mechanisms import GATES

# Default table per teacher mechanism (from_teacher): degrees (5,4) for ReLU (docs/design.md: (3,2) is
# too coarse, +7% MSE), (9,8) for the jump-type gates. Every mechanism also has (3,2), (5,4) and (9,8)
# tables, at the default's cut-off for the jumps.
DEFAULT_TEACHER_TABLES = {"relu": "relu_5_4", "jumprelu": "jumprelu_9_8_t0.3", "topk": "topk_9_8"}


def teacher_table(mechanism: str, degrees, denominator: str = "B") -> str:
    """The fitted table an upgrade starts from: the mechanism's default (its `_A` twin for version
    A), or with `degrees` given a table of that gate, degrees and denominator, preferring the
    default's cut-off (jumprelu (5, 4) -> jumprelu_5_4_t0.3, as the default is at t0 = 0.3)."""
    default = DEFAULT_TEACHER_TABLES[mechanism] + ("_A" if denominator == "A" else "")
    if degrees is None:
        return default
    p, q = (int(x) for x in degrees)
    cutoff = load_table(default)["cutoff"]
    tables = {n: load_table(n) for n in available_tables()}
    matches = [n for n, t in tables.items() if (t["gate"], t["degrees"], t["denominator"]) == (mechanism, (p, q), denominator)]
    require(bool(matches), f"no fitted {mechanism} table with degrees ({p}, {q}) and denominator {denominator}; "
                           f"available: {available_tables()}; pass init_table")
    return min(matches, key=lambda n: (n != default, tables[n]["cutoff"] != cutoff, n))


def teacher_mechanism(teacher: SAE) -> str:
    """The sparsity mechanism a teacher declares (`SAE.mechanism`): relu | jumprelu | topk | batchtopk | gated."""
    if teacher.mechanism is None:
        raise ConfigError(f"cannot upgrade a {type(teacher).__name__}: expected a ReLU, JumpReLU, TopK, BatchTopK or Gated SAE")
    if teacher.mechanism not in GATES and teacher.upgrade_threshold() is None:  # no mask reproduces it
        raise ConfigError(f"cannot upgrade a {type(teacher).__name__}: its mechanism {teacher.mechanism!r} is no rational "
                          f"SAE mask ({', '.join(GATES[1:])}) and it gives no upgrade_threshold for the jumprelu mask")
    return teacher.mechanism


class FromTeacher:
    """RationalSAE's upgrade methods (a mixin: it reads the rational SAE's own attributes)."""

    @classmethod
    def from_teacher(
        cls,
        teacher: SAE,
        degrees: Sequence[int] | None = None,
        gate: str = "teacher",
        init_table: str | None = None,
        denominator: str = "B",
        sharing: str = "shared",
        n_groups: int = 1,
        scale_mode: str = "latent",
        **kw,
    ) -> "RationalSAE":
        """A RationalSAE with the teacher's W_enc, b_enc, W_dec, b_dec copied exactly.

        gate: teacher (its own mechanism, stored concretely) or none | relu | jumprelu | topk.
        init_table: default per teacher mechanism (`DEFAULT_TEACHER_TABLES`; with `degrees`
        given, the table of that gate with those degrees, e.g. relu_3_2). Data-free start for
        the scales: C_in_j = C_out_j = theta_j / t0 (t0 = the table's cut-off) for JumpReLU and
        BatchTopK teachers with a jump table, else 1; `calibrate` on the teacher's
        pre-activations then sets them from data (see `init_scales`) and fits the gate.
        Remaining keywords go to the constructor (loss weights, t_max, ...)."""
        mech = teacher_mechanism(teacher)
        thr = teacher.upgrade_threshold()  # per-latent inference thresholds (JumpReLU, BatchTopK)
        base_mech = "jumprelu" if thr is not None else mech  # the mask that reproduces the teacher
        gate = base_mech if gate == "teacher" else gate
        require(gate in GATES, f"gate must be one of {GATES + ('teacher',)}, got {gate!r}")
        if init_table is None:
            init_table = teacher_table(base_mech, degrees, denominator)
        k = kw.pop("k", None)
        if gate == "topk":
            k = k if k is not None else getattr(teacher, "k", None)
        kw.setdefault("unit_norm_decoder", teacher.unit_norm_decoder)
        kw.setdefault("init_seed", 0)
        sae = cls(
            teacher.d_in, teacher.d_sae, degrees=degrees, denominator=denominator, sharing=sharing, n_groups=n_groups,
            scale_mode=scale_mode, init_table=init_table, gate=gate, k=k, **kw,
        )
        with torch.no_grad():
            for name, t in teacher.skeleton_weights().items():  # the teacher's h = (x - b_dec) W_enc + b_enc
                getattr(sae, name).copy_(t)
            sae.tokens_since_fired.copy_(teacher.tokens_since_fired)
        sae.mask.copy_from_teacher(sae, teacher, thr)
        sae.teacher_threshold = thr
        sae.teacher_k = getattr(teacher, "k", None)  # TopK-type teachers
        if thr is not None and sae.rational_gate.cutoff > 0:
            c = sae._scales_from_thresholds(thr)
            sae.rational_gate.set_scales(c, c)
        return sae.to(teacher.W_enc.device)

    def _scales_from_thresholds(self, thr: Tensor) -> Tensor:
        c = thr.float().clamp_min(1e-12) / self.rational_gate.cutoff
        return c if self.rational_gate.scale_mode == "latent" else c.mean().reshape(1)

    @torch.no_grad()
    def init_scales(self, h: Tensor) -> Tensor:
        """C_in (and C_out = C_in) from data h [N, d_sae]; returns C_in.

        * A mask decides which latents fire (gate relu / jumprelu / topk), or the table is a ReLU
          fit: C_in_j = max_i |h_ij|, so every pre-activation lies in [-1, 1] where the table
          was fitted (latents never seen non-zero get the median). With a mask the jump need not
          come from the rational, and theta_j / t0 would push latents whose activations reach
          far above their threshold past the clamp t_max (the gate saturates there).
        * Pure rational gate (none) with a jump table: align every latent's jump with the
          table's cut-off t0: C_in_j = theta_j / t0 for JumpReLU / BatchTopK teachers; for a
          TopK teacher C_in = tau_hat / t0 with tau_hat the mean over tokens of the k-th largest
          pre-activation (the BatchTopK-style estimate of the cut-off). C_in_j is raised where
          needed to keep |h_ij| / C_in_j <= t_max / 2 on the data.
        scale_mode=scalar: the global max / the mean threshold."""
        h = h.detach().float()
        g = self.rational_gate
        latent = g.scale_mode == "latent"
        m = h.abs().amax(0)
        if not latent:
            m = m.max().reshape(1)
        pos = m[m > 0]
        m = torch.where(m > 0, m, pos.median() if pos.numel() else torch.ones(()))
        c = m
        if self.gate == "none" and g.cutoff > 0:
            if self.teacher_threshold is not None:
                c = self._scales_from_thresholds(self.teacher_threshold.to(h.device))
            elif self.teacher_k is not None:
                tau = torch.topk(h, self.teacher_k, dim=-1).values[:, -1].mean().clamp_min(1e-12)
                c = (tau / g.cutoff).reshape(1).expand_as(m).clone()
            c = torch.maximum(c, m / (0.5 * g.t_max))
        c = c.clamp_min(1e-12)
        g.set_scales(c, c)
        return c

    def calibrate(
        self,
        h_samples: Tensor,
        teacher_z_samples: Tensor,
        steps: int = 200,
        lr: float | None = None,
        init_scales: bool = True,
        optimizer: str = "lbfgs",
        batch_size: int | None = None,
        max_entries: int | None = 4_000_000,
        seed: int = 0,
    ) -> dict[str, float]:
        """Fit the gate's (a, b, C_in, C_out) so that phi(h) * mask ~ z_teacher (L2), with the
        SAE's weights and thresholds frozen. h_samples: [N, d_sae] pre-activations (normalised
        units, e.g. `self.pre_acts(x)`); teacher_z_samples: the teacher's codes on them.
        init_scales: first set C_in, C_out from the data (`init_scales`; otherwise the current
        scales, e.g. from_teacher's theta_j / t0, are the start). steps / lr / optimizer /
        batch_size / max_entries: see `rsae.rational.calibrate_gate` (default: full-batch L-BFGS,
        200 iterations). Returns the relative L2 error of the codes before / after, the resulting
        C_in range and the fraction of sample entries beyond the clamp (|h / C_in| > t_max)."""
        require(h_samples.shape == teacher_z_samples.shape and h_samples.shape[-1] == self.d_sae,
                f"h and teacher codes must both be [N, {self.d_sae}], got {list(h_samples.shape)} and {list(teacher_z_samples.shape)}")
        h = h_samples.detach().to(self.W_enc.device).float()
        target = teacher_z_samples.detach().to(h.device).float()
        if init_scales:
            self.init_scales(h)
        with torch.no_grad():
            mask = self.gate_mask(h)
        frozen = [p for n, p in self.named_parameters() if not n.startswith("rational_gate.")]
        flags = [p.requires_grad for p in frozen]
        for p in frozen:
            p.requires_grad_(False)
        try:
            stats = calibrate_gate(self.rational_gate, h, target, mask, steps=steps, lr=lr, optimizer=optimizer,
                                   batch_size=batch_size, max_entries=max_entries, seed=seed)
        finally:
            for p, f in zip(frozen, flags):
                p.requires_grad_(f)
        with torch.no_grad():
            c = self.rational_gate.c_in.detach()
            clamped = float(((h / c).abs() > self.rational_gate.t_max).float().mean())
        return {**stats, "c_in_min": float(c.min()), "c_in_max": float(c.max()), "fraction_clamped": clamped}

    @torch.no_grad()
    def codes_error(self, h_samples: Tensor, teacher_z_samples: Tensor) -> float:
        """Relative L2 error of this SAE's codes against the teacher's on the same h."""
        return relative_l2(self.activation(h_samples.float()), teacher_z_samples.float())
