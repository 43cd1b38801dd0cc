"""Fit r(t) = P(t) / Q(t) to a fixed SAE gate on a grid of [-1, 1]: minimax and least squares.

Targets (t in normalised units, `cutoff` = t0 or tau):
    relu      max(t, 0)
    jumprelu  t * H(t - t0)         (the JumpReLU gate with its threshold at t0)
    topk      t * H(t - tau)        (the TopK gate seen as a threshold at the cut-off tau)

Which denominator class is fitted (the SAME form as the gate):
    The gate uses Q(t) = 1 + |S(t)|, S(t) = b_1 t + ... + b_q t^q (version B). We fit directly in
    the subclass where S(t) >= 0 on the fitting grid, imposed as linear constraints
    sum_j b_j t_i^j >= 0. There 1 + |S| == 1 + S, so the fit is an ordinary rational fit with a
    denominator that is >= 1 on [-1, 1] and equals 1 at t = 0; the minimax problem becomes a
    sequence of linear programs. (Fitting an unconstrained plain Q and checking afterwards that
    it has no sign change is not enough: 1 + |S| equals Q / Q(0) only where Q >= Q(0), i.e. Q
    must have its minimum at 0.) The subclass is all we need: the best (3,2) / (5,4) fits of
    ReLU found in the literature have this form (Q = 1 + 2.38 t^2 for (3,2)). The full
    version-B class is larger (S may change sign, giving kinks); least-squares refinement below
    works in the full class because it evaluates the gate's own formula.
    Version A, Q = 1 + sum_j c_j |t|^j with c_j = |b_j| >= 0, is linear in c, so it is fitted
    directly the same way with c >= 0.
    Every error recorded is recomputed with `rsae.rational.function.rational` (the gate's code).

Minimax: the differential-correction algorithm (Cheney & Loeb 1961; Barrodale, Powell & Roberts
1972), which converges to the best approximation on the grid. Given the current fit (P_k, Q_k)
with error d_k, solve the LP
    minimise s  s.t.  |f_i Q(t_i) - P(t_i)| - d_k Q(t_i) <= s Q_k(t_i)  for every grid point,
                      S(t_i) >= 0,  |a|, |b| <= bound,
and accept the new (P, Q) while s < 0 (its error is then below d_k). LPs are solved by HiGHS
through scipy (imported only when fitting; loading tables needs no scipy).

Jumps: no continuous function approximates a jump of height h with max error below h / 2, so a
plain minimax fit of t H(t - t0) has error >= t0 / 2 and is badly non-unique (and an unbounded fit
drives coefficients to ~1e12, which breaks in fp32). For jump targets we therefore (i) bound
every coefficient by `bound` (1e3) and (ii) minimise the max error outside a transition window
|t - t0| < `window`, while inside the window r is only required to stay between the two branches
(0 and t) up to the same error. Rational functions approximate sign() with error exponentially
small in the degree away from the jump (Zolotarev), which this criterion measures. The full-grid
max error (necessarily >= t0 / 2) is recorded as well.

Least squares: minimise the mean squared error on the grid over the full version-B (or A) class
with L-BFGS in float64, starting from the minimax fit; coefficients stay inside (-bound, bound)
through c = bound * tanh(raw / bound).

Tables: `python -m rsae.rational.fit --regenerate` rewrites src/rsae/rational/tables/*.json
(the specs are in `TABLE_SPECS`); `--check` recomputes each table's recorded errors.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from rsae.rational.function import DENOMINATORS, rational

GATES = ("relu", "jumprelu", "topk")
N_POINTS = 4001
BOUND = 1e3
JUMP_WINDOW = 0.05
TABLE_DIR = Path(__file__).with_name("tables")


# --- targets and error measurement -------------------------------------------------------------
def grid(n_points: int = N_POINTS) -> np.ndarray:
    return np.linspace(-1.0, 1.0, n_points)


def gate_target(gate: str, t: np.ndarray, cutoff: float = 0.0) -> np.ndarray:
    """The gate on normalised pre-activations: relu max(t, 0); jumprelu / topk t * H(t - cutoff)."""
    if gate == "relu":
        return np.maximum(t, 0.0)
    if gate in ("jumprelu", "topk"):
        return np.where(t > cutoff, t, 0.0)
    raise ValueError(f"gate must be one of {GATES}, got {gate!r}")


def evaluate(a, b, t: np.ndarray, denominator: str = "B") -> np.ndarray:
    """r on `t` through the gate's own code, in float64."""
    tt = torch.as_tensor(t, dtype=torch.float64)
    return rational(tt, torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), denominator).numpy()


def measure(a, b, gate: str, cutoff: float = 0.0, denominator: str = "B", n_points: int = N_POINTS, window: float = 0.0) -> dict[str, float]:
    """max error and MSE on the grid; for jumps also the max error outside |t - cutoff| < window."""
    t = grid(n_points)
    err = np.abs(evaluate(a, b, t, denominator) - gate_target(gate, t, cutoff))
    out = {"max_error": float(err.max()), "mse": float(np.mean(err**2))}
    if gate != "relu":
        outside = np.abs(t - cutoff) >= window
        out["max_error_outside_window"] = float(err[outside].max())
    return out


# --- minimax by differential correction ---------------------------------------------------------
def _bases(t: np.ndarray, p: int, q: int, denominator: str) -> tuple[np.ndarray, np.ndarray]:
    """Numerator basis [1, t, ..., t^p] and denominator basis (t^j or |t|^j, j = 1..q)."""
    num = np.vander(t, p + 1, increasing=True)
    base = t if denominator == "B" else np.abs(t)
    den = np.vander(base, q + 1, increasing=True)[:, 1:]
    return num, den


def minimax_fit(
    t: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    degrees: tuple[int, int],
    denominator: str = "B",
    bound: float = BOUND,
    tol: float = 1e-9,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Minimise d such that lower_i - d <= r(t_i) <= upper_i + d on every grid point (lower =
    upper = f for a plain minimax fit). Returns (a, b, d).

    The LPs run on a subset of the grid (every 10th point to start), exchanging in the points
    where the full grid is worse (classic exchange / cutting planes): the result is the minimax
    fit on the whole grid, at a fraction of the cost of LPs with 3 x 4001 rows."""
    p, q = degrees
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator!r}")
    A, B = _bases(t, p, q, denominator)
    a, b = np.zeros(p + 1), np.zeros(q)
    active = np.zeros(len(t), dtype=bool)
    active[:: max(1, len(t) // 400)] = True
    active[[0, -1]] = True
    active |= lower != upper  # a jump's window is small; keep all of it
    for _ in range(50):
        idx = np.flatnonzero(active)
        a, b, d = _differential_correction(A[idx], B[idx], lower[idx], upper[idx], a, b, denominator, bound, tol)
        err = _envelope_error(A, B, a, b, lower, upper)
        s_neg = (B @ b < 0) if denominator == "B" and q > 0 else np.zeros(len(t), dtype=bool)
        worse = (err > d * (1 + 1e-7) + 1e-12) | s_neg
        if not worse[~active].any():
            return a, b, float(err.max())
        # Add the local maxima of the error that exceed the subset's level, and S < 0 points.
        cand = np.flatnonzero(worse & ~active)
        top = cand[np.argsort(err[cand])[::-1][:64]]
        active[top] = True
        active[np.flatnonzero(s_neg)] = True
    return a, b, float(_envelope_error(A, B, a, b, lower, upper).max())


def _envelope_error(A, B, a, b, lower, upper) -> np.ndarray:
    r = (A @ a) / (1 + np.abs(B @ b))
    return np.maximum(r - upper, lower - r)


def _differential_correction(A, B, lower, upper, a, b, denominator, bound, tol, max_iter: int = 200):
    from scipy.optimize import linprog

    n, p1 = A.shape
    q = B.shape[1]
    d = float(_envelope_error(A, B, a, b, lower, upper).max())
    # Variables x = [a_0..a_p, b_1..b_q, s]; minimise s.
    b_bounds = (-bound, bound) if denominator == "B" else (0.0, bound)
    bounds = [(-bound, bound)] * p1 + [b_bounds] * q + [(-1.0, None)]
    cost = np.zeros(p1 + q + 1)
    cost[-1] = 1.0
    s_rows = np.hstack([np.zeros((n, p1)), -B, np.zeros((n, 1))])  # -S(t_i) <= 0
    for _ in range(max_iter):
        w = 1 + np.abs(B @ b)  # Q_k on the grid
        # P - (u + d) Q <= s Q_k   ->    A a - (u + d) B b - Q_k s <= u + d
        g_up = np.hstack([A, -(upper + d)[:, None] * B, -w[:, None]])
        # (l - d) Q - P <= s Q_k   ->   -A a + (l - d) B b - Q_k s <= -(l - d)
        g_lo = np.hstack([-A, (lower - d)[:, None] * B, -w[:, None]])
        rows, rhs = [g_up, g_lo], [upper + d, -(lower - d)]
        if denominator == "B" and q > 0:  # S(t_i) >= 0, so that 1 + |S| = 1 + S here
            rows.append(s_rows)
            rhs.append(np.zeros(n))
        res = linprog(cost, A_ub=np.vstack(rows), b_ub=np.concatenate(rhs), bounds=bounds, method="highs")
        if res.status != 0:
            break
        a_new, b_new = res.x[:p1], res.x[p1:-1]
        d_new = float(_envelope_error(A, B, a_new, b_new, lower, upper).max())
        if d_new < d:
            a, b, d = a_new, b_new, d_new
        if res.x[-1] >= -tol or d_new >= d:
            break
    return a, b, d
