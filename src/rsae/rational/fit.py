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
from dataclasses import asdict, dataclass
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
        if d_new >= d:
            break
        a, b, d = a_new, b_new, d_new
        if res.x[-1] >= -tol:
            break
    return a, b, d


# --- fits of the three gates ---------------------------------------------------------------------
@dataclass
class FitResult:
    """One fitted gate: coefficients (ascending a_0..a_p, b_1..b_q) and their measured errors."""

    gate: str
    degrees: tuple[int, int]
    cutoff: float
    method: str
    denominator: str
    a: list[float]
    b: list[float]
    max_error: float
    mse: float
    max_error_outside_window: float | None = None
    window: float = 0.0
    n_points: int = N_POINTS
    bound: float = BOUND


def envelopes(gate: str, t: np.ndarray, cutoff: float, window: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower / upper targets: f itself, except inside a jump's window where r may lie anywhere
    between the two branches (0 and t)."""
    f = gate_target(gate, t, cutoff)
    lower, upper = f.copy(), f.copy()
    if gate != "relu" and window > 0:
        inside = np.abs(t - cutoff) < window
        lower[inside] = np.minimum(0.0, t[inside])
        upper[inside] = np.maximum(0.0, t[inside])
    return lower, upper


def least_squares_fit(t: np.ndarray, f: np.ndarray, a0, b0, denominator: str = "B", bound: float = BOUND, steps: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Minimise mean (r(t_i) - f_i)^2 over the gate's own form, from (a0, b0), by L-BFGS in float64."""
    tt, ff = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(f, dtype=torch.float64)

    def raw(c):
        c = torch.as_tensor(np.asarray(c, dtype=np.float64)).clamp(-0.999 * bound, 0.999 * bound)
        return (torch.atanh(c / bound) * bound).requires_grad_(True)

    ra, rb = raw(a0), raw(b0)
    opt = torch.optim.LBFGS([ra, rb], lr=1, max_iter=steps, tolerance_grad=1e-14, tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (rational(tt, bound * torch.tanh(ra / bound), bound * torch.tanh(rb / bound), denominator) - ff).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        a, b = bound * torch.tanh(ra / bound), bound * torch.tanh(rb / bound)
    if denominator == "A":
        b = b.abs()  # the sign of b_j is irrelevant in version A; store |b_j|
    return a.numpy(), b.numpy()


def fit_gate(
    gate: str,
    degrees: tuple[int, int],
    cutoff: float | None = None,
    method: str = "minimax",
    denominator: str = "B",
    n_points: int = N_POINTS,
    window: float | None = None,
    bound: float = BOUND,
) -> FitResult:
    """Fit r of type `degrees` = (p, q) to `gate` on `n_points` equispaced points of [-1, 1].

    gate: relu | jumprelu | topk; cutoff: t0 / tau for jumps (normalised units; 0 for relu).
    method: minimax | lsq (least squares, started from the minimax fit).
    window: half-width of the transition window around a jump excluded from the minimax
    criterion (default `JUMP_WINDOW`; 0 gives the plain minimax fit, error >= cutoff / 2).
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if method not in ("minimax", "lsq"):
        raise ValueError(f"method must be 'minimax' or 'lsq', got {method!r}")
    p, q = (int(x) for x in degrees)
    if p < 0 or q < 0:
        raise ValueError(f"degrees must be non-negative, got {degrees}")
    if gate == "relu":
        cutoff, window = 0.0, 0.0
    else:
        if cutoff is None or not -1 < cutoff < 1:
            raise ValueError(f"{gate} needs a cutoff in (-1, 1), got {cutoff}")
        window = JUMP_WINDOW if window is None else float(window)
    t = grid(n_points)
    lower, upper = envelopes(gate, t, cutoff, window)
    a, b, _ = minimax_fit(t, lower, upper, (p, q), denominator, bound)
    if method == "lsq":
        a, b = least_squares_fit(t, gate_target(gate, t, cutoff), a, b, denominator, bound)
    m = measure(a, b, gate, cutoff, denominator, n_points, window)
    return FitResult(
        gate=gate, degrees=(p, q), cutoff=float(cutoff), method=method, denominator=denominator,
        a=[float(x) for x in a], b=[float(x) for x in b], max_error=m["max_error"], mse=m["mse"],
        max_error_outside_window=m.get("max_error_outside_window"), window=window, n_points=n_points, bound=bound,
    )


# --- shipped tables ------------------------------------------------------------------------------
REGENERATE_COMMAND = "python -m rsae.rational.fit --regenerate"

# name -> (gate, degrees, cutoff, denominator). All minimax, 4001 points, |coef| <= 1e3; jumps with
# the transition window JUMP_WINDOW. The TopK table's canonical cut-off is tau = 0.2: a TopK
# teacher is calibrated with C_in = tau_hat / 0.2 (tau_hat = mean k-th largest pre-activation,
# the BatchTopK-style inference threshold), which keeps pre-activations up to 5 tau_hat inside
# [-1, 1]; JumpReLU teachers use C_in_j = theta_j / t0 with the table's t0. Every gate has degrees
# (3,2), (5,4) and (9,8) (jumps at the upgrade defaults' t0 = 0.3 / tau = 0.2) for a degrees ablation.
# Every version-B table has a version-A twin named <name>_A (for `sae.denominator=A`).
_B_SPECS: dict[str, tuple[str, tuple[int, int], float]] = {
    "relu_3_2": ("relu", (3, 2), 0.0),
    "relu_5_4": ("relu", (5, 4), 0.0),
    "relu_9_8": ("relu", (9, 8), 0.0),
    "jumprelu_3_2_t0.3": ("jumprelu", (3, 2), 0.3),
    "jumprelu_5_4_t0.3": ("jumprelu", (5, 4), 0.3),
    "jumprelu_9_8_t0.1": ("jumprelu", (9, 8), 0.1),
    "jumprelu_9_8_t0.2": ("jumprelu", (9, 8), 0.2),
    "jumprelu_9_8_t0.3": ("jumprelu", (9, 8), 0.3),
    "jumprelu_9_8_t0.5": ("jumprelu", (9, 8), 0.5),
    "topk_3_2": ("topk", (3, 2), 0.2),
    "topk_5_4": ("topk", (5, 4), 0.2),
    "topk_9_8": ("topk", (9, 8), 0.2),
}
TABLE_SPECS: dict[str, tuple[str, tuple[int, int], float, str]] = {
    **{name: (*spec, "B") for name, spec in _B_SPECS.items()},
    **{f"{name}_A": (*spec, "A") for name, spec in _B_SPECS.items()},
}


def table_record(name: str, result: FitResult) -> dict:
    rec = {"name": name, **asdict(result), "command": REGENERATE_COMMAND}
    rec["degrees"] = list(result.degrees)
    if result.gate == "relu":
        rec.pop("max_error_outside_window")
    return rec


def regenerate(out_dir: Path = TABLE_DIR, names: list[str] | None = None) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for name in names or list(TABLE_SPECS):
        gate, degrees, cutoff, denominator = TABLE_SPECS[name]
        rec = table_record(name, fit_gate(gate, degrees, cutoff or None, method="minimax", denominator=denominator))
        tmp = out_dir / f"{name}.json.tmp"
        tmp.write_text(json.dumps(rec, indent=2) + "\n")
        tmp.replace(out_dir / f"{name}.json")
        records.append(rec)
    return records


def check_table(table: dict) -> dict[str, float]:
    """Recompute a table's errors with the gate's own code; returns the recomputed values."""
    return measure(table["a"], table["b"], table["gate"], table["cutoff"], table["denominator"], table["n_points"], table.get("window", 0.0))


def _summary(rec: dict) -> str:
    p, q = rec["degrees"]
    s = f"{rec['name']:<20} {rec['gate']:<9} ({p},{q}) cutoff={rec['cutoff']:<4g} max={rec['max_error']:.6f} mse={rec['mse']:.3e}"
    if rec.get("max_error_outside_window") is not None:
        s += f" max(|t-cutoff|>={rec['window']:g})={rec['max_error_outside_window']:.6f}"
    return s


def main(argv: list[str] | None = None) -> int:
    from rsae.rational.coefficients import available_tables, load_table

    ap = argparse.ArgumentParser(prog="python -m rsae.rational.fit", description=__doc__.splitlines()[0])
    ap.add_argument("--regenerate", action="store_true", help=f"refit and rewrite every table in {TABLE_DIR}")
    ap.add_argument("--check", action="store_true", help="recompute the recorded errors of the shipped tables")
    ap.add_argument("--gate", choices=GATES, help="fit one gate and print it (no table written)")
    ap.add_argument("--degrees", type=int, nargs=2, default=(5, 4), metavar=("P", "Q"))
    ap.add_argument("--cutoff", type=float, default=None)
    ap.add_argument("--method", choices=("minimax", "lsq"), default="minimax")
    ap.add_argument("--denominator", choices=DENOMINATORS, default="B")
    ap.add_argument("--window", type=float, default=None)
    args = ap.parse_args(argv)
    if args.regenerate:
        for rec in regenerate():
            print(_summary(rec))
    if args.check:
        bad = 0
        for name in available_tables():
            table = load_table(name)
            got = check_table(table)
            ok = all(math.isclose(got[k], table[k], rel_tol=1e-6, abs_tol=1e-12) for k in got)
            bad += not ok
            print(("ok   " if ok else "DIFF ") + _summary(table))
        if bad:
            return 1
    if args.gate:
        res = fit_gate(args.gate, tuple(args.degrees), args.cutoff, args.method, args.denominator, window=args.window)
        rec = table_record(f"{args.gate}_{args.degrees[0]}_{args.degrees[1]}", res)
        rec.pop("command")  # a one-off fit, not a shipped table
        print(json.dumps(rec, indent=2))
    if not (args.regenerate or args.check or args.gate):
        ap.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
