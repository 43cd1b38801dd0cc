"""Rational SAE: the gate is phi(h) = C_out * r(h / C_in), r = P / Q a rational function
(`rsae.rational.RationalGate`), optionally multiplied by a mask that decides which latents fire.

Mask (`gate`, a mechanism of `rsae.sae.mechanisms.MASKS`, which owns its maths and loss terms):
    none      z = phi(h): the pure rational gate, non-zero almost everywhere (report L0 at
              tolerances, `l0_at_tolerances`)
    relu      z = phi(h) * 1[h > 0]
    jumprelu  z = phi(h) * 1[h > theta_j], per-latent thresholds theta_j = exp(log_threshold_j)
              trained through JumpReLU's straight-through estimator (rectangle kernel)
    topk      z = phi(h) * 1[h_j among the k largest of the token and h_j > 0]
    teacher   only for `from_teacher`: resolved to the teacher's own mechanism and stored as that
              (ReLU -> relu; JumpReLU -> jumprelu with its thresholds; TopK -> topk with its k;
              BatchTopK -> jumprelu with its global inference threshold on every latent)
The rational shapes the magnitude of the active codes; the mask decides which are active.

Loss: mse + l1_coefficient * sum_j m_j ||W_dec_j|| (linear warm-up over l1_warmup_steps, as
ReLUSAE) with m = |z| (`sparsity: codes`, the paper's lambda ||z||_1) or the mask's own sparsity
mechanism (`sparsity: mask`: ReLU(h) for gate=relu, none for jumprelu/topk) + l0_coefficient *
L0 (gate=jumprelu only, JumpReLU's step estimator) + AuxK (gate=topk, as TopKSAE, weight
aux_coefficient).

Upgrading a trained teacher (docs/design.md, section 1): `from_teacher` and `calibrate`, in
`rsae.sae.rational_upgrade`.

Export (SAELens layout, `architecture: "rational"`): tensors `rational_a` [n_sets, p+1],
`rational_b` [n_sets, q], `rational_c_in`, `rational_c_out` ([1] or [d_sae]) and `threshold`
(gate=jumprelu). The activation-scale fold of `SAE.export_tensors` leaves h unchanged, so the
gate's parameters are exported as they are.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from rsae.rational.coefficients import available_tables
from rsae.rational.function import DENOMINATORS, T_MAX, rational_compute
from rsae.rational.gate import SCALE_MODES, SHARING, RationalGate
from rsae.sae import fast
from rsae.sae.base import SAE, ConfigError, SAEOutput, require, resolve_d_sae
from rsae.sae.mechanisms import GATES, MASKS, Mask
from rsae.sae.mechanisms.base import switched_on
from rsae.sae.mechanisms.relu import linear_warmup, weighted_abs_sum, weighted_l1
from rsae.sae.mechanisms.topk import default_k_aux
from rsae.sae.rational_upgrade import DEFAULT_TEACHER_TABLES, FromTeacher, teacher_mechanism

__all__ = ["RationalSAE", "GATES", "DEFAULT_TEACHER_TABLES", "teacher_mechanism", "contribution_l0", "mean_contribution"]

def contribution_l0(z: Tensor, decoder_norms: Tensor, tolerances: Sequence[float], reference: float | None = None) -> dict[float, float]:
    """Mean count per token of latents whose contribution |z_j| * ||W_dec_j|| exceeds eps * reference.

    reference: the scale eps is relative to; None uses the mean contribution of the non-zero
    entries of `z` itself. To compare with a teacher, pass the teacher's mean contribution
    (`mean_contribution(z_teacher, teacher_norms)`), as the numbers in docs/design.md do."""
    c = z.detach().abs().float() * decoder_norms.detach().float()
    if reference is None:
        reference = mean_contribution(z, decoder_norms)
    n = max(1, c.numel() // max(1, c.shape[-1]))  # tokens
    return {float(eps): float((c > eps * reference).sum()) / n for eps in tolerances}


def mean_contribution(z: Tensor, decoder_norms: Tensor) -> float:
    """Mean over the non-zero entries of z of |z_j| * ||W_dec_j||."""
    c = z.detach().abs().double() * decoder_norms.detach().double()
    nz = c[c > 0]
    return float(nz.mean()) if nz.numel() else 0.0


class RationalSAE(FromTeacher, SAE):
    architecture = "rational"

    def __init__(
        self,
        d_in: int,
        d_sae: int | None = None,
        degrees: Sequence[int] | None = None,
        denominator: str = "B",
        sharing: str = "shared",
        n_groups: int = 1,
        scale_mode: str = "latent",
        init_table: str | None = "relu_5_4",
        c_in_init: float = 4.0,
        c_out_init: float | None = None,
        t_max: float = T_MAX,
        gate: str = "relu",
        k: int | None = None,
        init_threshold: float = 0.1,
        bandwidth: float = 0.05,
        l1_coefficient: float = 5.0,
        sparsity: str = "codes",
        l1_warmup_steps: int = 0,
        l0_coefficient: float = 0.0,
        l0_warmup_steps: int = 0,
        aux_coefficient: float = 1 / 32,
        k_aux: int | None = None,
        **kw,
    ) -> None:
        """degrees: (p, q), or None to take them from init_table. denominator: B (1 + |sum b_j t^j|)
        or A (1 + sum |b_j| |t|^j). sharing: shared | group | latent coefficient sets (n_groups
        for group). scale_mode: scalar | latent C_in, C_out. init_table: fitted table the gate
        starts from (`rsae.rational.available_tables()`; None: r(t) ~ t). c_in_init / c_out_init:
        initial scales (c_out defaults to c_in, so phi ~ the table's gate on |h| <= c_in).
        t_max: clamp of h / C_in. gate: none | relu | jumprelu | topk (see the module docstring);
        k for topk; init_threshold and bandwidth for jumprelu. Loss weights as described above.
        Other keywords (expansion_factor, unit_norm_decoder, init_seed, dead_after_tokens) go
        to `SAE`."""
        require(isinstance(d_in, int) and d_in >= 1, f"d_in must be a positive integer, got {d_in!r}")
        d_sae = resolve_d_sae(d_in, d_sae, kw.pop("expansion_factor", None))
        require(isinstance(d_sae, int) and d_sae >= 1, f"d_sae must be a positive integer, got {d_sae!r}")
        if gate == "teacher":
            raise ConfigError("gate='teacher' needs a teacher SAE: build with RationalSAE.from_teacher(teacher, ...)")
        require(gate in GATES, f"gate must be one of {GATES + ('teacher',)}, got {gate!r}")
        MASKS[gate].check(d_sae, k)
        require(init_table is None or init_table in available_tables(), f"unknown init_table {init_table!r}; available: {available_tables()}")
        require(sparsity in ("codes", "mask"), f"sparsity must be 'codes' or 'mask', got {sparsity!r}")
        require(l1_coefficient >= 0 and l0_coefficient >= 0 and aux_coefficient >= 0, "loss coefficients must be >= 0")
        require(l1_warmup_steps >= 0 and l0_warmup_steps >= 0, "warm-up steps must be >= 0")
        require(bandwidth > 0 and init_threshold > 0, "bandwidth and init_threshold must be > 0")
        require(k_aux is None or 0 < k_aux <= d_sae, f"k_aux must satisfy 0 < k_aux <= d_sae, got {k_aux}")
        super().__init__(d_in, d_sae, **kw)
        try:
            self.rational_gate = RationalGate(
                d_sae, degrees=None if degrees is None else tuple(int(x) for x in degrees), denominator=denominator,
                sharing=sharing, n_groups=int(n_groups), scale_mode=scale_mode, init_table=init_table,
                c_in=c_in_init, c_out=c_out_init, t_max=t_max,
            )
        except (ValueError, KeyError) as exc:
            raise ConfigError(str(exc).strip("'\"")) from exc
        self.gate = gate
        self.k = int(k) if k is not None else None
        self.bandwidth = float(bandwidth)
        self.l1_coefficient, self.l1_warmup_steps = float(l1_coefficient), int(l1_warmup_steps)
        self.sparsity = sparsity
        self.l0_coefficient, self.l0_warmup_steps = float(l0_coefficient), int(l0_warmup_steps)
        self.aux_coefficient = float(aux_coefficient)
        self.k_aux = k_aux if k_aux is not None else default_k_aux(d_in, d_sae)
        self.mask.add_state(self, init_threshold)
        # Teacher facts `calibrate` uses to initialise C_in (set by from_teacher; not exported).
        self.teacher_threshold: Tensor | None = None
        self.teacher_k: int | None = None

    # --- gate ----------------------------------------------------------------------------------
    @property
    def mask(self) -> Mask:
        """The mechanism that decides which latents fire (`rsae.sae.mechanisms.MASKS[gate]`)."""
        return MASKS[self.gate]

    @property
    def threshold(self) -> Tensor:
        if self.gate != "jumprelu":  # AttributeError keeps hasattr(sae, "threshold") meaningful
            raise AttributeError(f"a rational SAE with gate={self.gate} has no thresholds")
        return self.log_threshold.exp()

    def gate_mask(self, h: Tensor) -> Tensor | None:
        """The 0/1 mask in h's dtype (None for gate=none). For jumprelu it carries the
        straight-through gradient to the thresholds."""
        return self.mask(h, self)

    def activation(self, h: Tensor) -> Tensor:
        return self.mask.codes(self.rational_gate, h, self)

    # --- training -----------------------------------------------------------------------------
    def training_codes(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """With the L1 term on |z| and a gate the rational kernel applies alone (relu, none): z and
        its column sums of |z| from one call, which on the GPU computes them in the same pass and
        takes the L1 gradient into its backward (`rational_gate_triton(abs_colsum=True)`)."""
        mask = self.mask
        if fast.enabled() and mask.kernel_alone and mask.penalises_codes(self.sparsity):
            return self.rational_gate(h, positive_only=mask.positive_only, abs_colsum=True)
        return self.activation(h), None

    def aux_losses(self, x: Tensor, out: SAEOutput, step: int) -> dict[str, Tensor]:
        """L1 on what the mask says (|z| under `sparsity: codes`) plus the mask's own terms."""
        # The mask's terms first, while nothing is on this frame's stack: TopK's AuxK breaks the
        # compiled graph, and a dict or bound method held across that break dies after the step,
        # which invalidates the compiled resume function and recompiles every step.
        mask_losses = self.mask.losses(self, x, out, step)
        losses: dict[str, Tensor] = {}
        if switched_on(self.l1_coefficient):
            coef = self.l1_coefficient * linear_warmup(step, self.l1_warmup_steps)
            if out.z_abs_sums is not None:  # sum_j norm_j * sum_rows |z_j|, averaged over rows
                losses["l1"] = coef * weighted_abs_sum(out.z_abs_sums, self.decoder_norms()) / out.z.shape[0]
            elif (magnitudes := self._l1_magnitudes(out)) is not None:
                losses["l1"] = coef * weighted_l1(magnitudes, self.decoder_norms())
        return {**losses, **mask_losses}

    def uses_auxk(self) -> bool:
        return self.mask.uses_auxk(self)

    def sparsity_lever(self) -> str | None:
        return self.mask.sparsity_lever(self.sparsity)

    def _l1_magnitudes(self, out: SAEOutput) -> Tensor | None:
        """What the L1 term penalises. `codes`: |z| (the paper's lambda ||z||_1). `mask`: the mask's
        own sparsity mechanism, so the penalty decides which latents fire while the rational shapes
        magnitudes freely: ReLU(h) for gate=relu (an L1 on |z| can be met by shrinking the rational
        instead, which leaves L0 unchanged), nothing for jumprelu (its L0 term on the thresholds)
        and topk (k is fixed)."""
        if self.mask.penalises_codes(self.sparsity):
            return out.z.float().abs()
        return self.mask.own_magnitudes(out)

    @torch.no_grad()
    def train_metrics(self) -> dict[str, Tensor]:
        """The gate's shape where the masked gate acts: r(0) (under a mask, a jump of C_out_j r(0)
        at h = 0), r(1) (the top of the range calibration fits) and r(t_max), averaged over the
        coefficient sets, and the median gain C_out / C_in."""
        g = self.rational_gate
        a, b = g.coefficients()
        t = torch.tensor([0.0, 1.0, g.t_max], device=a.device, dtype=torch.float32)
        r = rational_compute(t.expand(a.shape[0], 3).T.contiguous(), a.float(), b.float(), g.denominator, g.t_max).mean(-1)
        return {"gate_r0": r[0], "gate_r1": r[1], "gate_r_tmax": r[2], "gate_gain": (g.c_out / g.c_in).median()}

    # --- L0 of a dense code -------------------------------------------------------------------
    def l0_at_tolerances(self, z: Tensor, tolerances: Sequence[float], reference: float | None = None, relative: bool = True) -> dict[float, float]:
        """Mean count per token of "active" latents at each tolerance eps.

        relative=True: |z_j| * ||W_dec_j|| > eps * reference, reference defaulting to the mean
        contribution of the non-zero entries of z (pass a teacher's `mean_contribution` to
        compare with it). relative=False: |z_j| > eps (absolute, as ReconstructionMetrics'
        `l0_tolerances`)."""
        if relative:
            return contribution_l0(z, self.decoder_norms(), tolerances, reference)
        n = max(1, z.numel() // max(1, z.shape[-1]))
        return {float(eps): float((z.detach().abs() > eps).sum()) / n for eps in tolerances}

    def mean_contribution(self, z: Tensor) -> float:
        return mean_contribution(z, self.decoder_norms())

    # --- export -------------------------------------------------------------------------------
    def export_config(self) -> dict:
        g = self.rational_gate
        cfg = {
            "architecture": "rational",
            "degrees": list(g.degrees),
            "denominator": g.denominator,
            "sharing": g.sharing,
            "n_groups": g.n_groups,
            "scale_mode": g.scale_mode,
            "t_max": g.t_max,
            "gate": self.gate,
            "sparsity": self.sparsity,
            "init_table": g.init_table,  # provenance only: the tensors carry the coefficients
            **self.mask.export_config(self),
        }
        return cfg

    def export_tensors(self, scale: float = 1.0) -> dict[str, Tensor]:
        # The scale fold leaves h unchanged, so the gate (and thresholds) are not rescaled.
        g = self.rational_gate
        out = {
            **super().export_tensors(scale),
            "rational_a": g.a.detach().float().contiguous(),
            "rational_b": g.b.detach().float().contiguous(),
            "rational_c_in": g.c_in.detach().float().contiguous(),
            "rational_c_out": g.c_out.detach().float().contiguous(),
            **self.mask.export_tensors(self),
        }
        return out

    @classmethod
    def export_fields(cls, read) -> tuple[dict, dict]:
        p, q = read.degrees()
        gate = read.choice("gate", GATES, default="relu")
        sharing = read.choice("sharing", SHARING, default="shared")
        n_groups = read.int("n_groups", 1, read.d_sae, default=1)
        scale_mode = read.choice("scale_mode", SCALE_MODES, default="latent")
        fields = {"degrees": [p, q], "gate": gate, "sharing": sharing, "n_groups": n_groups, "scale_mode": scale_mode,
                  "denominator": read.choice("denominator", DENOMINATORS, default="B"),
                  "t_max": read.number("t_max", default=T_MAX),
                  "sparsity": read.choice("sparsity", ("codes", "mask"), default="codes")}
        mask_fields, tensors = MASKS[gate].export_fields(read)
        sets = {"shared": 1, "group": n_groups, "latent": read.d_sae}[sharing]
        scales = read.d_sae if scale_mode == "latent" else 1
        why = f"sharing={sharing}" + (f", n_groups={n_groups}" if sharing == "group" else "")
        tensors.update({
            "rational_a": ((sets, p + 1), f"[sets, p + 1] for {why}, degrees=[{p}, {q}] in {read.name}"),
            "rational_b": ((sets, q), f"[sets, q] for {why}, degrees=[{p}, {q}] in {read.name}"),
            "rational_c_in": ((scales,), f"scale_mode={scale_mode} in {read.name}"),
            "rational_c_out": ((scales,), f"scale_mode={scale_mode} in {read.name}"),
        })
        return {**fields, **mask_fields}, tensors

    @classmethod
    def kwargs_from_export(cls, cfg: dict) -> dict:
        gate = cfg.get("gate", "relu")
        kw = {
            "degrees": tuple(int(x) for x in cfg["degrees"]),
            "denominator": cfg.get("denominator", "B"),
            "sharing": cfg.get("sharing", "shared"),
            "n_groups": int(cfg.get("n_groups", 1)),
            "scale_mode": cfg.get("scale_mode", "latent"),
            "t_max": float(cfg.get("t_max", T_MAX)),
            "gate": gate,
            "sparsity": cfg.get("sparsity", "codes"),
            "init_table": None,  # the tensors carry the coefficients
            **MASKS[gate].kwargs_from_export(cfg),
        }
        return kw

    def load_exported(self, tensors: dict[str, Tensor], cfg: dict) -> None:
        super().load_exported(tensors, cfg)
        g = self.rational_gate
        for name, p in (("rational_a", g.a), ("rational_b", g.b), ("rational_c_in", g.log_c_in), ("rational_c_out", g.log_c_out)):
            require(name in tensors, f"rational SAE weights lack tensor {name!r}")
            require(tensors[name].shape == p.shape, f"{name}: expected shape {list(p.shape)}, got {list(tensors[name].shape)}")
        with torch.no_grad():
            g.a.copy_(tensors["rational_a"])
            g.b.copy_(tensors["rational_b"])
        g.set_scales(tensors["rational_c_in"], tensors["rational_c_out"])
        self.mask.load_exported(self, tensors)
