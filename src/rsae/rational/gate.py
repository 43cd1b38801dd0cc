"""RationalGate: phi(h) = C_out * r(h / C_in) applied along the last (latent) dimension.

Coefficient sharing (`sharing`):
    shared  one set (a, b) for every latent (the paper's "handful of scalars"; default)
    group   `n_groups` sets; latent j uses set floor(j * n_groups / d) (contiguous blocks whose
            sizes differ by at most one)
    latent  one set per latent
Scales (`scale_mode`): one scalar C_in and C_out, or one per latent ("latent"). Both are kept
positive by storing their logs (`log_c_in`, `log_c_out`); `set_scales` inverts exactly, i.e.
exp(log_c) reproduces the given float32 value bit for bit whenever exp can produce it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from rsae.rational.coefficients import load_table
from rsae.rational.function import DENOMINATORS, T_MAX, cast_back, compute_dtype, rational_compute
from rsae.rational.kernel import rational_gate_triton, use_kernel

SHARING = ("shared", "group", "latent")
SCALE_MODES = ("scalar", "latent")


def exact_log(c: Tensor) -> Tensor:
    """float32 l with exp(l) == c (float32) wherever exp can hit c exactly, else the closest.

    log then exp loses up to an ulp or two; stepping l by single ulps towards the target fixes it,
    which makes an export -> load round trip of positive parameters stored by their logs exact."""
    c = c.detach().float()
    if not bool((c > 0).all()):
        raise ValueError("exact_log needs positive values")
    best = c.double().log().float()
    best_err = (best.exp() - c).abs()
    cur = best.clone()
    for _ in range(8):
        e = cur.exp()
        if bool((best_err == 0).all()):
            break
        toward = torch.where(e < c, torch.full_like(cur, math.inf), torch.full_like(cur, -math.inf))
        cur = torch.nextafter(cur, toward)
        err = (cur.exp() - c).abs()
        better = err < best_err
        best = torch.where(better, cur, best)
        best_err = torch.where(better, err, best_err)
    return best


IDENTITY_B = 1e-4


def identity_coefficients(p: int, q: int) -> tuple[list[float], list[float]]:
    """r(t) ~ t (needs p >= 1): a = (0, 1, 0, ...), b_j = 1e-4.

    b is not exactly 0: the denominator goes through |.|, whose derivative torch takes as 0 at
    0, so b = 0 would never receive a gradient. With b_j = 1e-4, |r(t) - t| <= q 1e-4 |t| on
    [-1, 1]."""
    if p < 1:
        raise ValueError("the identity needs a numerator of degree >= 1")
    return [0.0, 1.0] + [0.0] * (p - 1), [IDENTITY_B] * q


class RationalGate(nn.Module):
    def __init__(
        self,
        d: int,
        degrees: Sequence[int] | None = None,
        denominator: str = "B",
        sharing: str = "shared",
        n_groups: int = 1,
        scale_mode: str = "scalar",
        init_table: str | None = None,
        c_in: float = 1.0,
        c_out: float | None = None,
        t_max: float = T_MAX,
    ) -> None:
        """d: number of latents (size of the last dimension of h).
        degrees: (p, q); None takes them from `init_table`.
        init_table: name of a fitted table (see `rsae.rational.coefficients`) copied into every
        coefficient set; None starts from r(t) ~ t (`identity_coefficients`).
        c_in, c_out: initial scales (c_out defaults to c_in, so phi(h) ~ gate(h) for the table's gate).
        t_max: clamp of t = h / C_in before the powers (see `rsae.rational.function`)."""
        super().__init__()
        table = load_table(init_table) if init_table is not None else None
        if degrees is None:
            if table is None:
                raise ValueError("give degrees or an init_table")
            degrees = table["degrees"]
        p, q = (int(x) for x in degrees)
        if p < 0 or q < 0:
            raise ValueError(f"degrees must be non-negative, got {tuple(degrees)}")
        if table is not None and tuple(table["degrees"]) != (p, q):
            raise ValueError(f"table {init_table!r} has degrees {tuple(table['degrees'])}, not ({p}, {q})")
        if table is not None and table["denominator"] != denominator:
            twin = init_table[:-2] if init_table.endswith("_A") else f"{init_table}_A"
            raise ValueError(f"table {init_table!r} was fitted with denominator {table['denominator']}, not {denominator}"
                             f" (its version-{denominator} twin is {twin!r})")
        if denominator not in DENOMINATORS:
            raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator!r}")
        if sharing not in SHARING:
            raise ValueError(f"sharing must be one of {SHARING}, got {sharing!r}")
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        if sharing == "group" and not 1 <= n_groups <= d:
            raise ValueError(f"n_groups must be in [1, d={d}], got {n_groups}")
        if not (c_in > 0 and (c_out is None or c_out > 0) and t_max > 0):
            raise ValueError("c_in, c_out and t_max must be positive")
        self.d, self.degrees, self.denominator = d, (p, q), denominator
        self.sharing, self.scale_mode, self.t_max = sharing, scale_mode, float(t_max)
        self.n_groups = n_groups if sharing == "group" else (1 if sharing == "shared" else d)
        self.init_table = init_table
        self.cutoff = float(table["cutoff"]) if table is not None else 0.0  # t0 / tau of the table's gate

        a0, b0 = (table["a"], table["b"]) if table is not None else identity_coefficients(p, q)
        n_sets = self.n_groups
        self.a = nn.Parameter(torch.tensor(a0, dtype=torch.float32).repeat(n_sets, 1))
        self.b = nn.Parameter(torch.tensor(b0, dtype=torch.float32).reshape(1, q).repeat(n_sets, 1))
        n_scales = d if scale_mode == "latent" else 1
        self.log_c_in = nn.Parameter(torch.full((n_scales,), math.log(c_in)))
        self.log_c_out = nn.Parameter(torch.full((n_scales,), math.log(c_out if c_out is not None else c_in)))
        # Latent -> coefficient set (group sharing only); derived, so not saved in state dicts.
        self.register_buffer("set_index", (torch.arange(d) * self.n_groups) // d, persistent=False)

    # --- parameters as the formula uses them ---------------------------------------------------
    @property
    def c_in(self) -> Tensor:
        return self.log_c_in.exp()

    @property
    def c_out(self) -> Tensor:
        return self.log_c_out.exp()

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """(a, b) laid out for `rational`: [1, .] (shared) or [d, .] (group / latent)."""
        if self.sharing == "group":
            return self.a[self.set_index], self.b[self.set_index]
        return self.a, self.b

    @torch.no_grad()
    def set_coefficients(self, a, b) -> None:
        """Copy one set (1-d) into every set, or all sets ([n_sets, .])."""
        a = torch.as_tensor(a, dtype=self.a.dtype).to(self.a.device)
        b = torch.as_tensor(b, dtype=self.b.dtype).to(self.b.device).reshape(*a.shape[:-1], self.degrees[1])
        self.a.copy_(a.expand_as(self.a))
        self.b.copy_(b.expand_as(self.b))

    @torch.no_grad()
    def set_scales(self, c_in=None, c_out=None) -> None:
        """Set C_in / C_out (scalars or [d] tensors; positive), exactly (see `exact_log`)."""
        for value, param in ((c_in, self.log_c_in), (c_out, self.log_c_out)):
            if value is None:
                continue
            value = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
            if value.numel() not in (1, param.numel()):
                raise ValueError(f"scale has {value.numel()} values, the gate has {param.numel()}")
            param.copy_(exact_log(value.to(param.device)).expand_as(param))

    # --- the gate ------------------------------------------------------------------------------
    def forward(self, h: Tensor, positive_only: bool = False, abs_colsum: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """phi(h); with `positive_only`, phi(h) * [h > 0] (the ReLU mask, fused on the GPU). With
        `abs_colsum`, (that, the sum of its |values| over all but the last dimension, in float32
        or wider): what an L1 penalty reads, computed in the same pass on the GPU."""
        if use_kernel(h):  # CUDA: the fused Triton kernel (same formula, checked against this path)
            return rational_gate_triton(h, self.a, self.b, self.c_in, self.c_out, denominator=self.denominator,
                                        set_index=self.set_index if self.sharing == "group" else None, t_max=self.t_max,
                                        positive_only=positive_only, abs_colsum=abs_colsum)
        ct = compute_dtype(h.dtype)
        with torch.autocast(device_type=h.device.type, enabled=False):
            a, b = self.coefficients()
            c_in = self.c_in.to(ct).clamp_min(torch.finfo(ct).tiny)
            t = h.to(ct) / c_in
            y = self.c_out.to(ct) * rational_compute(t, a.to(ct), b.to(ct), self.denominator, self.t_max)
        y = cast_back(y, h.dtype)
        y = y * (h > 0).to(h.dtype) if positive_only else y
        if not abs_colsum:
            return y
        return y, y.abs().reshape(-1, self.d).sum(0, dtype=torch.promote_types(y.dtype, torch.float32))

    def forward_entries(self, values: Tensor, latent: Tensor) -> Tensor:
        """phi for scattered entries: values[i] is a pre-activation of latent latent[i] (1-d
        tensors of equal length). Same formula as `forward`, without the dense [N, d] layout."""
        ct = compute_dtype(values.dtype)
        with torch.autocast(device_type=values.device.type, enabled=False):
            a, b = self.coefficients()
            if a.shape[0] > 1:
                a, b = a[latent], b[latent]
            c_in, c_out = self.c_in, self.c_out
            if c_in.numel() > 1:
                c_in, c_out = c_in[latent], c_out[latent]
            t = values.to(ct) / c_in.to(ct).clamp_min(torch.finfo(ct).tiny)
            y = c_out.to(ct) * rational_compute(t, a.to(ct), b.to(ct), self.denominator, self.t_max)
        return cast_back(y, values.dtype)

    def extra_repr(self) -> str:
        p, q = self.degrees
        return (
            f"d={self.d}, degrees=({p}, {q}), denominator={self.denominator}, sharing={self.sharing}, "
            f"n_sets={self.n_groups}, scale_mode={self.scale_mode}, t_max={self.t_max}, init_table={self.init_table}"
        )
