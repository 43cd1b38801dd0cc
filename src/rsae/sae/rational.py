"""Rational SAE: the gate is phi(h) = C_out * r(h / C_in), r = P / Q a rational function
(`rsae.rational.RationalGate`), optionally multiplied by a mask that decides which latents fire.

Mask (`gate`):
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
mechanism (`sparsity: mask`: ReLU(h) for gate=relu, none for jumprelu/topk) + l0_coefficient * L0 (gate=jumprelu only, JumpReLU's step estimator) + AuxK
(gate=topk, as TopKSAE, weight aux_coefficient).

Upgrading a trained teacher (docs/design.md, section 1): `RationalSAE.from_teacher(teacher)` copies the
encoder/decoder exactly and sets the mask and a fitted table; `calibrate(h, z_teacher)` then fits
(a, b, C_in, C_out) on the teacher's real pre-activations with everything else frozen.

Export (SAELens layout, `architecture: "rational"`): tensors `rational_a` [n_sets, p+1],
`rational_b` [n_sets, q], `rational_c_in`, `rational_c_out` ([1] or [d_sae]) and `threshold`
(gate=jumprelu). The activation-scale fold of `SAE.export_tensors` leaves h unchanged, so the
gate's parameters are exported as they are.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from rsae.rational.calibrate import calibrate_gate, relative_l2
from rsae.rational.coefficients import available_tables, load_table
from rsae.rational.function import T_MAX
from rsae.rational.gate import RationalGate, exact_log
from rsae.sae import fast
from rsae.sae.base import SAE, ConfigError, SAEOutput, require, resolve_d_sae
from rsae.sae.batchtopk import BatchTopKSAE
from rsae.sae.jumprelu import JumpReLUSAE, _Step
from rsae.sae.relu import ReLUSAE, linear_warmup
from rsae.sae.topk import TopKSAE

GATES = ("none", "relu", "jumprelu", "topk")

# Default table per teacher mechanism (from_teacher): degrees (5,4) for ReLU (docs/design.md: (3,2) is
# too coarse, +7% MSE), (9,8) for the jump-type gates.
DEFAULT_TEACHER_TABLES = {"relu": "relu_5_4", "jumprelu": "jumprelu_9_8_t0.3", "topk": "topk_9_8"}


def teacher_mechanism(teacher: SAE) -> str:
    """relu | jumprelu | topk | batchtopk for the fixed-gate SAEs rsae knows."""
    if isinstance(teacher, BatchTopKSAE):  # before TopKSAE: it is a subclass
        return "batchtopk"
    if isinstance(teacher, TopKSAE):
        return "topk"
    if isinstance(teacher, JumpReLUSAE):
        return "jumprelu"
    if isinstance(teacher, ReLUSAE):
        return "relu"
    raise ConfigError(f"cannot upgrade a {type(teacher).__name__}: expected a ReLU, JumpReLU, TopK or BatchTopK SAE")


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


def _switched_on(coefficient: float | Tensor) -> bool:
    """Whether a loss term is on, without reading a device value: a tensor coefficient is one a
    controller holds (HoldL0, always > 0)."""
    return isinstance(coefficient, Tensor) or coefficient > 0


class RationalSAE(SAE):
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
        if gate == "topk":
            require(k is not None and 0 < int(k) <= d_sae, f"gate=topk needs k with 0 < k <= d_sae ({d_sae}), got {k}")
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
        self.k_aux = k_aux if k_aux is not None else min(d_sae, max(1, d_in // 2))
        if gate == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))
        # Teacher facts `calibrate` uses to initialise C_in (set by from_teacher; not exported).
        self.teacher_threshold: Tensor | None = None
        self.teacher_k: int | None = None

    # --- gate ----------------------------------------------------------------------------------
    @property
    def threshold(self) -> Tensor:
        if self.gate != "jumprelu":  # AttributeError keeps hasattr(sae, "threshold") meaningful
            raise AttributeError(f"a rational SAE with gate={self.gate} has no thresholds")
        return self.log_threshold.exp()

    def gate_mask(self, h: Tensor) -> Tensor | None:
        """The 0/1 mask in h's dtype (None for gate=none). For jumprelu it carries the
        straight-through gradient to the thresholds."""
        if self.gate == "none":
            return None
        if self.gate == "relu":
            return (h > 0).to(h.dtype)
        if self.gate == "jumprelu":
            return _Step.apply(h, self.threshold.to(h.dtype), self.bandwidth)
        # topk: the k largest pre-activations of each token, then those > 0 (as TopKSAE's ReLU)
        idx = torch.topk(h, self.k, dim=-1, sorted=False).indices
        top = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, idx, True)
        return (top & (h > 0)).to(h.dtype)

    def activation(self, h: Tensor) -> Tensor:
        if self.gate == "relu":  # phi(h) * [h > 0] in one pass on the GPU
            return self.rational_gate(h, positive_only=True)
        phi = self.rational_gate(h)
        mask = self.gate_mask(h)
        return phi if mask is None else phi * mask

    # --- training -----------------------------------------------------------------------------
    def training_codes(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """With the L1 term on |z| and a gate the rational kernel applies alone (relu, none): z and
        its column sums of |z| from one call, which on the GPU computes them in the same pass and
        takes the L1 gradient into its backward (`rational_gate_triton(abs_colsum=True)`)."""
        if fast.enabled() and self.gate in ("relu", "none") and (self.sparsity == "codes" or self.gate == "none"):
            return self.rational_gate(h, positive_only=self.gate == "relu", abs_colsum=True)
        return self.activation(h), None

    def aux_losses(self, x: Tensor, out: SAEOutput, step: int) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if _switched_on(self.l1_coefficient):
            coef = self.l1_coefficient * linear_warmup(step, self.l1_warmup_steps)
            if out.z_abs_sums is not None:  # sum_j norm_j * sum_rows |z_j|, averaged over rows
                losses["l1"] = coef * (out.z_abs_sums * self.decoder_norms().float()).sum() / out.z.shape[0]
            elif (magnitudes := self._l1_magnitudes(out)) is not None:
                losses["l1"] = coef * (magnitudes * self.decoder_norms().float()).sum(-1).mean()
        if self.gate == "jumprelu" and _switched_on(self.l0_coefficient):
            coef = self.l0_coefficient * linear_warmup(step, self.l0_warmup_steps)
            losses["l0"] = coef * _Step.apply(out.h.float(), self.threshold.float(), self.bandwidth).sum(-1).mean()
        if self.gate == "topk" and self.aux_coefficient > 0:
            # TopK's AuxK on the raw pre-activations of dead latents (uses aux_coefficient, k_aux,
            # dead_mask and W_dec, which this class has too).
            losses.update(TopKSAE.aux_losses(self, x, out, step))
        return losses

    def uses_auxk(self) -> bool:
        return self.gate == "topk" and self.aux_coefficient > 0

    def _l1_magnitudes(self, out: SAEOutput) -> Tensor | None:
        """What the L1 term penalises. `codes`: |z| (the paper's lambda ||z||_1). `mask`: the mask's
        own sparsity mechanism, so the penalty decides which latents fire while the rational shapes
        magnitudes freely: ReLU(h) for gate=relu (an L1 on |z| can be met by shrinking the rational
        instead, which leaves L0 unchanged), nothing for jumprelu (its L0 term on the thresholds)
        and topk (k is fixed)."""
        if self.sparsity == "codes" or self.gate == "none":
            return out.z.float().abs()
        if self.gate == "relu":
            return torch.relu(out.h.float())
        return None

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

    # --- upgrade from a teacher ---------------------------------------------------------------
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
        base_mech = {"batchtopk": "jumprelu"}.get(mech, mech)
        gate = base_mech if gate == "teacher" else gate
        require(gate in GATES, f"gate must be one of {GATES + ('teacher',)}, got {gate!r}")
        thr: Tensor | None = None
        if mech == "jumprelu":
            thr = teacher.threshold.detach().float()
        elif mech == "batchtopk":
            thr = teacher.inference_threshold.detach().float().expand(teacher.d_sae).clone()
        if init_table is None:
            init_table = DEFAULT_TEACHER_TABLES[base_mech]
            if degrees is not None and tuple(int(x) for x in degrees) != load_table(init_table)["degrees"]:
                p, q = (int(x) for x in degrees)
                matches = [n for n in available_tables() if n.startswith(f"{base_mech}_{p}_{q}")]
                require(bool(matches), f"no fitted {base_mech} table with degrees ({p}, {q}); available: {available_tables()}; pass init_table")
                init_table = matches[0]
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
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(getattr(teacher, name))
            sae.tokens_since_fired.copy_(teacher.tokens_since_fired)
            if gate == "jumprelu" and thr is not None:
                if mech == "jumprelu":
                    sae.log_threshold.copy_(teacher.log_threshold)  # bit-identical thresholds
                else:
                    sae.log_threshold.copy_(exact_log(thr.clamp_min(1e-12)))
        sae.teacher_threshold = thr
        sae.teacher_k = getattr(teacher, "k", None) if mech in ("topk", "batchtopk") else None
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
        }
        if self.gate == "topk":
            cfg["k"] = self.k
        if self.gate == "jumprelu":
            cfg["bandwidth"] = self.bandwidth
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
        }
        if self.gate == "jumprelu":
            out["threshold"] = self.threshold.detach().float().contiguous()
        return out

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
        }
        if gate == "topk":
            kw["k"] = int(cfg["k"])
        if gate == "jumprelu":
            kw["bandwidth"] = float(cfg.get("bandwidth", 0.05))
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
        if self.gate == "jumprelu":
            require("threshold" in tensors, "rational SAE with gate=jumprelu lacks tensor 'threshold'")
            with torch.no_grad():
                self.log_threshold.copy_(exact_log(tensors["threshold"].float().clamp_min(1e-12)))
