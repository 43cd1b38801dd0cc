"""The rational function r(t) = P(t) / Q(t) with a pole-free ("safe Pade") denominator.

This is the reference implementation: plain torch, one readable function, the oracle any fused
kernel must match.

    P(t) = a_0 + a_1 t + ... + a_p t^p
    version B (default):  Q(t) = 1 + | b_1 t + b_2 t^2 + ... + b_q t^q |
    version A:            Q(t) = 1 + |b_1| |t| + |b_2| |t|^2 + ... + |b_q| |t|^q

Q(t) >= 1 for every t, so r has no pole. Both polynomials are evaluated by Horner's rule.

Numerics (the choices a kernel must reproduce):
* Computed in float32 (float64 stays float64): bf16 / fp16 inputs and coefficients are cast up
  inside, autocast is switched off for the body, and the result is cast back to the input dtype.
* The argument is clamped to [-t_max, t_max] (default `T_MAX` = 8) before the powers are formed.
  The gate is designed for t in [-1, 1]; the clamp leaves 8x head-room for extrapolation, and
  beyond it r is constant (r(+-t_max)) with zero gradient w.r.t. t. With |t| <= 8 the largest
  power for degree 20 is 8^20 ~ 1e18, far from float32 overflow (3e38), so huge inputs (1e30,
  even +-inf, clamp to +-t_max) never give Inf or NaN. NaN inputs stay NaN.
* When the result is cast back to a narrower dtype (fp16) it is first clamped to that dtype's
  finite range, so a large but finite value never becomes Inf.
* d|s|/ds at s = 0 is taken as 0 (torch's convention). In version B, S(0) = 0 always, so the
  gradient w.r.t. b at t = 0 is 0.

Coefficient layout: `a` has shape [n, p + 1] (a_0 ... a_p, ascending) and `b` shape [n, q]
(b_1 ... b_q), where n is 1 (one set for every element) or the size of the last dimension of `t`
(one set per position along it, e.g. per latent). 1-d `a` / `b` are treated as n = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

T_MAX = 8.0
DENOMINATORS = ("B", "A")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is evaluated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast_back(y: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast a float32/64 result to `dtype`, clamping to its finite range first (never Inf)."""
    if y.dtype == dtype:
        return y
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(y.dtype).max:
        big = torch.finfo(dtype).max
        y = y.clamp(-big, big)  # NaN stays NaN
    return y.to(dtype)


def _as_sets(c: Tensor) -> Tensor:
    return c.unsqueeze(0) if c.ndim == 1 else c


def check_coefficients(a: Tensor, b: Tensor, last_dim: int | None = None) -> None:
    a, b = _as_sets(a), _as_sets(b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"coefficients must be [n, p+1] and [n, q], got {list(a.shape)} and {list(b.shape)}")
    if a.shape[1] < 1:
        raise ValueError("the numerator needs at least one coefficient (a_0)")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of coefficient sets, got {a.shape[0]} and {b.shape[0]}")
    if last_dim is not None and a.shape[0] not in (1, last_dim):
        raise ValueError(f"{a.shape[0]} coefficient sets do not broadcast over a last dimension of {last_dim}")


def rational_compute(t: Tensor, a: Tensor, b: Tensor, denominator: str = "B", t_max: float = T_MAX) -> Tensor:
    """r(t) in the dtype of `t`, which must already be float32 or float64 (no casting, no autocast
    handling). `rational` below is the public entry point."""
    a, b = _as_sets(a).to(t.dtype), _as_sets(b).to(t.dtype)
    p, q = a.shape[1] - 1, b.shape[1]
    t = t.clamp(-t_max, t_max)
    # Numerator, Horner: ((a_p t + a_{p-1}) t + ...) t + a_0.
    num = a[:, p].expand_as(t)
    for i in range(p - 1, -1, -1):
        num = num * t + a[:, i]
    if q == 0:
        return num + 0 * t  # a full tensor even for p = 0
    if denominator == "B":
        # S(t) = t (b_1 + t (b_2 + ... + t b_q)); Q = 1 + |S|.
        s = b[:, q - 1].expand_as(t)
        for j in range(q - 2, -1, -1):
            s = s * t + b[:, j]
        den = 1 + (s * t).abs()
    elif denominator == "A":
        # sum_j |b_j| |t|^j = |t| (|b_1| + |t| (|b_2| + ... )); Q = 1 + that.
        u, bb = t.abs(), b.abs()
        s = bb[:, q - 1].expand_as(t)
        for j in range(q - 2, -1, -1):
            s = s * u + bb[:, j]
        den = 1 + s * u
    else:
        raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator!r}")
    return num / den


def rational(t: Tensor, a: Tensor, b: Tensor, denominator: str = "B", t_max: float = T_MAX) -> Tensor:
    """r(t) = P(t) / Q(t) elementwise, evaluated in float32 (or float64), returned in t's dtype."""
    check_coefficients(a, b, t.shape[-1] if t.ndim else 1)
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator!r}")
    ct = compute_dtype(t.dtype)
    with torch.autocast(device_type=t.device.type, enabled=False):
        y = rational_compute(t.to(ct), a.to(ct), b.to(ct), denominator, t_max)
    return cast_back(y, t.dtype)

