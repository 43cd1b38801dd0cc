"""L2 calibration of a RationalGate to reproduce a teacher's codes on real pre-activations.

Minimises  sum ||phi(h) * mask - z_teacher||^2 / sum ||z_teacher||^2  over the gate's parameters
(a, b, C_in, C_out) with everything else frozen. `mask` is the student's own (fixed) mask, equal
to the teacher's when the mask mechanism is the teacher's; for the pure rational gate it is None.

Only the entries the loss can see are used: with a mask, the masked-in entries (the rest
contribute 0 - z_teacher, a constant) plus the entries where the teacher is non-zero; without
one, every entry. They are flattened with their latent index (`RationalGate.forward_entries`),
so a sparse mask costs its L0, not d_sae, per token.

Optimiser, in two stages on a float64 copy of the gate:
1. Linearised least squares for (a, b) with the scales fixed (Sanathanan-Koerner iteration):
   P(t) - y (1 + sigma S(t)) = y is linear in (a, b) once sigma = sign(S_k(t)) and the weights
   1 / Q_k(t) are taken from the previous iterate, so each step is one small weighted linear
   solve per coefficient set. This finds the least-squares coefficients directly (for a masked
   teacher, whose active codes are z = h, it recovers r(t) = (C_in / C_out) t exactly), which
   gradient methods reach only slowly: the monomial coefficients are strongly coupled (P and Q
   nearly cancel). Version B only (version A's |b_j| is not linear in b).
2. Full-batch L-BFGS (strong Wolfe line search) on everything, (a, b, C_in, C_out), from there;
   `optimizer="adam"` (minibatches of entries) is there for very large samples.
The best state seen (true loss) is kept.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from rsae.rational.function import rational_compute
from rsae.rational.gate import RationalGate


def relative_l2(pred: Tensor, target: Tensor) -> float:
    """||pred - target|| / ||target|| over all entries (float64 sums)."""
    num = (pred.double() - target.double()).pow(2).sum()
    return float((num / target.double().pow(2).sum().clamp_min(1e-300)).sqrt())


def _entries(h: Tensor, target: Tensor, mask: Tensor | None, max_entries: int | None, seed: int):
    """(values, latent index, target, mask value) of the entries the loss depends on."""
    if mask is None:
        keep = torch.ones_like(h, dtype=torch.bool)
    else:
        keep = (mask != 0) | (target != 0)
    rows, cols = keep.nonzero(as_tuple=True)
    if max_entries is not None and rows.numel() > max_entries:
        g = torch.Generator(device="cpu").manual_seed(seed)
        pick = torch.randperm(rows.numel(), generator=g)[:max_entries].to(rows.device)
        rows, cols = rows[pick], cols[pick]
    m = None if mask is None else mask[rows, cols]
    return h[rows, cols], cols, target[rows, cols], m


def calibrate_gate(
    gate: RationalGate,
    h: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    steps: int = 200,
    lr: float | None = None,
    optimizer: str = "lbfgs",
    batch_size: int | None = None,
    max_entries: int | None = 4_000_000,
    linearised_iters: int = 8,
    bound: float = 1e3,
    seed: int = 0,
) -> dict[str, float]:
    """Fit (a, b, C_in, C_out) of `gate` in place; returns the relative L2 error of the codes
    (over the sample) before and after.

    h, target, mask: [N, d] pre-activations, teacher codes and the fixed 0/1 mask (or None).
    steps: L-BFGS iterations (or Adam steps). lr: L-BFGS step length (default 1) or Adam
    learning rate (default 1e-3).
    batch_size: entries per Adam step (None: all). max_entries: subsample cap on the entries.
    linearised_iters: stage-1 iterations (0 skips it). bound: |coefficient| cap in stage 1."""
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    h, target = h.detach(), target.detach()
    mask = None if mask is None else mask.detach().to(h.dtype)
    vals, lat, tz, m = _entries(h, target, mask, max_entries, seed)
    # Entries outside the selection have mask 0 and target 0 and add nothing, so the target norm
    # over the selection is the full one (or, when subsampled, that of the subsample).
    total = tz.double().pow(2).sum().clamp_min(1e-300)
    work = copy.deepcopy(gate).double()
    vals64, tz64 = vals.double(), tz.double()
    m64 = None if m is None else m.double()

    def loss_on(idx=None) -> Tensor:
        v, l, t = (vals64, lat, tz64) if idx is None else (vals64[idx], lat[idx], tz64[idx])
        y = work.forward_entries(v, l)
        if m64 is not None:
            y = y * (m64 if idx is None else m64[idx])
        return (y - t).pow(2).sum() / (total if idx is None else t.pow(2).sum().clamp_min(1e-300))

    with torch.no_grad():
        before = float(loss_on())
    best, best_state = before, copy.deepcopy(work.state_dict())
    if linearised_iters > 0 and work.denominator == "B":
        cur = linearised_refit(work, vals64, lat, tz64, m64, total, linearised_iters, bound)
        if cur < best:
            best, best_state = cur, copy.deepcopy(work.state_dict())
        work.load_state_dict(best_state)
    params = list(work.parameters())
    if best < 1e-14:  # already exact to float64 round-off (e.g. a masked teacher: r(t) = t)
        steps = 0
    if steps > 0 and optimizer == "lbfgs":
        opt = torch.optim.LBFGS(params, lr=1.0 if lr is None else lr, max_iter=steps, history_size=50, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure():
            opt.zero_grad()
            loss = loss_on()
            loss.backward()
            return loss

        opt.step(closure)
    elif steps > 0:
        opt = torch.optim.Adam(params, lr=1e-3 if lr is None else lr)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        n = vals64.numel()
        for step in range(steps):
            idx = None if batch_size is None or batch_size >= n else torch.randint(0, n, (batch_size,), generator=gen).to(vals.device)
            loss = loss_on(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % 50 == 0 or step + 1 == steps:
                with torch.no_grad():
                    cur = float(loss_on())
                if cur < best:
                    best, best_state = cur, copy.deepcopy(work.state_dict())
    with torch.no_grad():
        cur = float(loss_on())
    if cur == cur and cur < best:
        best, best_state = cur, copy.deepcopy(work.state_dict())
    with torch.no_grad():
        for name, p in gate.named_parameters():
            p.copy_(best_state[name].to(p.dtype))
        after = float(loss_on_gate(gate, vals, lat, tz, m, total))
    return {"rel_l2_before": before**0.5, "rel_l2_after": after**0.5, "entries": int(vals.numel())}


def loss_on_gate(gate: RationalGate, vals, lat, tz, m, total) -> Tensor:
    """The calibration loss of `gate` as it is (float32 parameters after the copy back)."""
    y = gate.forward_entries(vals, lat)
    if m is not None:
        y = y * m
    return (y.double() - tz.double()).pow(2).sum() / total


@torch.no_grad()
def linearised_refit(gate: RationalGate, vals: Tensor, lat: Tensor, tz: Tensor, m: Tensor | None, total: Tensor, iters: int, bound: float) -> float:
    """Stage 1 (see the module docstring), in place on a float64 gate; returns the best loss
    reached (the gate is left at the best iterate)."""
    p, q = gate.degrees
    use = slice(None) if m is None else (m != 0)  # masked-out entries do not depend on (a, b)
    v, l, y_z = vals[use], lat[use], tz[use]
    c_in, c_out = gate.c_in, gate.c_out
    if c_in.numel() > 1:
        c_in, c_out = c_in[l], c_out[l]
    t = (v / c_in).clamp(-gate.t_max, gate.t_max)
    y = y_z / c_out  # target in units of r
    sets = torch.zeros_like(l) if gate.sharing == "shared" else (gate.set_index[l] if gate.sharing == "group" else l)
    n_sets = gate.a.shape[0]
    num = torch.stack([t**i for i in range(p + 1)], -1)
    den = torch.stack([t**j for j in range(1, q + 1)], -1) if q else t.new_zeros(t.shape[0], 0)
    col = torch.cat([num, den], -1).pow(2).mean(0).sqrt().clamp_min(1e-12)  # column scaling
    # The untouched part of the loss: entries masked out (mask 0, target non-zero).
    rest = 0.0 if m is None else float(tz[m == 0].pow(2).sum())

    def true_loss() -> float:
        a, b = gate.coefficients()
        r = rational_compute_entries(t, a, b, l, gate)
        return (float((c_out * (r - y)).pow(2).sum()) + rest) / float(total)

    best = true_loss()
    best_ab = (gate.a.detach().clone(), gate.b.detach().clone())
    for _ in range(iters):
        a_k, b_k = gate.coefficients()
        ab = a_k if a_k.shape[0] == 1 else a_k[sets]
        bb = b_k if b_k.shape[0] == 1 else b_k[sets]
        s_k = (den * bb).sum(-1) if q else torch.zeros_like(t)
        sigma = torch.where(s_k < 0, -1.0, 1.0).to(t.dtype)
        w = c_out / (1 + s_k.abs())  # residual in code units, linearised around Q_k
        x = torch.cat([num, -(y * sigma)[:, None] * den], -1) / col
        xw, yw = x * w[:, None], y * w
        gram, rhs = _normal_equations(xw, yw, sets, n_sets)
        k = x.shape[1]
        ridge = 1e-12 * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-300)
        gram = gram + ridge[:, None, None] * torch.eye(k, dtype=t.dtype, device=t.device)
        theta = torch.linalg.solve(gram, rhs[..., None])[..., 0] / col
        theta = theta.nan_to_num(0.0).clamp(-bound, bound)
        gate.a.copy_(theta[:, : p + 1])
        gate.b.copy_(theta[:, p + 1 :])
        cur = true_loss()
        if cur < best:
            best, best_ab = cur, (gate.a.detach().clone(), gate.b.detach().clone())
        if best < 1e-14:
            break
    gate.a.copy_(best_ab[0])
    gate.b.copy_(best_ab[1])
    return best


def _normal_equations(xw: Tensor, yw: Tensor, sets: Tensor, n_sets: int, chunk: int = 16384) -> tuple[Tensor, Tensor]:
    """Per-set X^T X and X^T y of the weighted rows (one matmul when all rows share a set)."""
    k = xw.shape[1]
    if n_sets == 1:
        return (xw.T @ xw)[None], (xw.T @ yw)[None]
    gram = xw.new_zeros(n_sets, k, k)
    rhs = xw.new_zeros(n_sets, k).index_add_(0, sets, xw * yw[:, None])
    for i in range(0, xw.shape[0], chunk):  # bounded memory for the [n, k, k] outer products
        xc = xw[i : i + chunk]
        gram.index_add_(0, sets[i : i + chunk], xc[:, :, None] * xc[:, None, :])
    return gram, rhs


def rational_compute_entries(t: Tensor, a: Tensor, b: Tensor, lat: Tensor, gate: RationalGate) -> Tensor:
    if a.shape[0] > 1:
        a, b = a[lat], b[lat]
    return rational_compute(t, a, b, gate.denominator, gate.t_max)
