"""Fused Triton kernels for the rational gate phi(h) = C_out * r(h / C_in), r = P / Q.

`rational_gate_triton(h, a, b, c_in, c_out, denominator=..., set_index=..., t_max=...)` computes
exactly what `RationalGate.forward` computes (the reference in `rsae.rational.gate` /
`rsae.rational.function` is the oracle), as a differentiable torch.library operator
(`rsae::rational_gate`, backward `rsae::rational_gate_backward`) around a fused forward kernel and a
fused backward kernel, so that `torch.compile` keeps a training step in one graph around it:

* arithmetic in float32 whatever the input dtype (bf16 / fp16 / fp32 in, same dtype out; float64
  is left to the reference), Horner's rule for P, Q and their derivatives;
* t = h / C_in (C_in clamped to the smallest normal float32, as the gate does), clamped to
  [-t_max, t_max] (zero gradient outside; NaN stays NaN), version B denominator
  Q = 1 + |sum_j b_j t^j| or version A Q = 1 + sum_j |b_j| |t|^j, with d|s|/ds = 0 at s = 0;
* a result cast back to a narrower dtype is first clamped to that dtype's finite range (and gets
  zero gradient where that clamp is active), as `cast_back` does;
* the backward recomputes P, Q from h (nothing but h is saved) and writes dh plus per-program
  partial sums of the gradients of every coefficient and scale: a program walks its rows for a
  block of latents, accumulating each parameter's gradient elementwise in registers, reduces
  over rows once at the end into one partial per latent; torch ops then sum the partials over
  programs (and over latents for shared coefficients / scalar scales, over each group's latents
  for group sharing). No atomics anywhere, so the result is deterministic.
* `positive_only=True` multiplies by the ReLU mask [h > 0] in the same pass (forward and
  backward), which saves the mask's own passes over the [rows, d] tensors.
* `abs_colsum=True` also returns the column sums of |y| (float32, per-program partials summed by
  torch): an L1 term read from them needs no pass over [rows, d] of its own, and its gradient
  (dL/dsum_j * sign(y)) is added to dL/dy inside the backward kernel. Left to torch, that
  gradient is an elementwise tensor which torch.compile folds into the decoder's input-gradient
  GEMM as an `addmm` (a copy of the [rows, d] tensor and a slower GEMM: about 0.13 ms per step at
  4096 x 24576 on the H200).
* t = h / C_in is computed as h * (1 / C_in) (one division per latent, not per element): the
  values can differ from the reference in the last bit of t.
* On CPU tensors `rational_gate_triton` needs Triton's interpreter (TRITON_INTERPRET=1 before
  triton is imported); tests run it so.

Coefficient layout as in the gate: `a` [n_sets, p + 1] (a_0 .. a_p), `b` [n_sets, q] (b_1 .. b_q)
with n_sets = 1 (shared), d (one set per latent) or any n_sets with `set_index` [d] giving each
latent's set (group sharing). `c_in`, `c_out`: the positive scales (e.g. `gate.c_in`,
`gate.c_out`), one value or one per latent; their gradients flow back through whatever produced
them (exp of the stored logs).

`use_kernel(h)` says whether the kernel applies (CUDA tensor of a supported dtype, Triton
importable, not switched off by `RSAE_RATIONAL_KERNEL=0` or `kernel_disabled()`).
RSAE_KERNEL_CONFIG="i,j" fixes the forward / backward tile shapes instead of autotuning them.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

from rsae.rational.function import DENOMINATORS, T_MAX
from rsae.triton_jit import interpreting, jit_functions

try:  # Triton is optional: without it `use_kernel` is False and the reference runs
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import problem means "no kernel"
    triton = tl = None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tile shapes (rows, latents, warps). The first is used by the interpreter; on a GPU each kernel
# picks the fastest once per problem shape (triton.autotune). The backward's tiles put a few rows
# of one or two latents in each thread (latents across the threads), so that its p + q + 3
# gradient accumulators stay in registers; `python -m rsae.bench rational_kernel` shows every shape
# is free of register spills on sm_90 up to degrees (9, 8).
FWD_CONFIGS = ((16, 128, 4), (32, 128, 8), (8, 256, 4), (32, 64, 4), (32, 256, 8), (64, 128, 8), (16, 256, 4))
BWD_CONFIGS = ((4, 128, 4), (4, 256, 8), (2, 256, 4), (4, 64, 2), (8, 128, 4), (8, 256, 8), (8, 64, 2))
ROW_QUANTUM = 8  # rows per backward program are a multiple of this
TARGET_PROGRAMS = 2048  # backward programs to aim at (several waves of several per multiprocessor)

_disabled = 0


def triton_available() -> bool:
    return triton is not None


def use_kernel(h: Tensor) -> bool:
    """True when `rational_gate_triton` should replace the reference for this input."""
    return (
        h.is_cuda
        and h.dtype in SUPPORTED_DTYPES
        and h.ndim >= 1
        and _disabled == 0
        and os.environ.get("RSAE_RATIONAL_KERNEL", "1") != "0"
        and triton_available()
    )


@contextlib.contextmanager
def kernel_disabled():
    """Within this block `use_kernel` is False (the reference runs), e.g. to time or compare both."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


# --- the kernels ----------------------------------------------------------------------------------
# Plain functions, turned into Triton kernels on first use (`_kernels`), so that importing this module
# costs nothing and works without Triton.


def _fwd_kernel(
    h_ptr, y_ptr, sum_ptr, a_ptr, b_ptr, set_ptr, cin_ptr, cout_ptr,
    n_rows, n_cols, stride_a, stride_b, t_max, big, ROWS_PER_PROG,
    P_DEG: tl.constexpr, Q_DEG: tl.constexpr, DEN_A: tl.constexpr, COEF_MODE: tl.constexpr,
    SCALE_PER_COL: tl.constexpr, POSITIVE_ONLY: tl.constexpr, ABS_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # A program computes BLOCK_N latents of one BLOCK_M-row tile, or with ABS_SUM of
    # ROWS_PER_PROG rows (a multiple of BLOCK_M), and writes its partial column sums of |y|.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols

    if SCALE_PER_COL:
        c_in = tl.load(cin_ptr + cols, mask=col_ok, other=1.0)[None, :]
        c_out = tl.load(cout_ptr + cols, mask=col_ok, other=1.0)[None, :]
    else:
        c_in = tl.load(cin_ptr)
        c_out = tl.load(cout_ptr)
    if COEF_MODE == 0:
        a_off = 0
        b_off = 0
    elif COEF_MODE == 1:
        a_off = cols * stride_a
        b_off = cols * stride_b
    else:
        sets = tl.load(set_ptr + cols, mask=col_ok, other=0)
        a_off = sets * stride_a
        b_off = sets * stride_b

    if ABS_SUM:
        row_start = pid_m * ROWS_PER_PROG
        row_stop = tl.minimum(row_start + ROWS_PER_PROG, n_rows)
    else:
        row_start = pid_m * BLOCK_M
        row_stop = tl.minimum(row_start + BLOCK_M, n_rows)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(row_start, row_stop, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_stop) & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = h * (1.0 / c_in)
        t = tl.where(t > t_max, t_max, t)
        t = tl.where(t < -t_max, -t_max, t)

        num = _coef(a_ptr, a_off + P_DEG, col_ok, COEF_MODE, False)
        for i2 in tl.static_range(P_DEG):
            num = num * t + _coef(a_ptr, a_off + (P_DEG - 1 - i2), col_ok, COEF_MODE, False)
        if Q_DEG > 0:
            if DEN_A:
                u = tl.abs(t)
            else:
                u = t
            s = _coef(b_ptr, b_off + (Q_DEG - 1), col_ok, COEF_MODE, DEN_A)
            for j2 in tl.static_range(Q_DEG - 1):
                s = s * u + _coef(b_ptr, b_off + (Q_DEG - 2 - j2), col_ok, COEF_MODE, DEN_A)
            if DEN_A:
                den = 1.0 + s * u
            else:
                den = 1.0 + tl.abs(s * u)
            r = num / den
        else:
            r = num + 0.0 * t
        y = c_out * r
        y = tl.where(y > big, big, y)
        y = tl.where(y < -big, -big, y)
        if POSITIVE_ONLY:  # times the 0/1 mask [h > 0] (a product, so NaN stays NaN as in phi * mask)
            y = y * tl.where(h > 0, 1.0, 0.0)
        out = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs, out, mask=mask)
        if ABS_SUM:  # of the result as stored (rounded to its dtype), as the L1 term reads it
            total += tl.sum(tl.where(mask, tl.abs(out.to(tl.float32)), 0.0), axis=0)
    if ABS_SUM:
        tl.store(sum_ptr + pid_m.to(tl.int64) * n_cols + cols, total, mask=col_ok)


def _coef(ptr, off, col_ok, COEF_MODE: tl.constexpr, ABS: tl.constexpr):
    """One coefficient: a scalar (shared) or a [1, BLOCK_N] row (one per latent)."""
    if COEF_MODE == 0:
        c = tl.load(ptr + off)
    else:
        c = tl.load(ptr + off, mask=col_ok, other=0.0)[None, :]
    if ABS:
        c = tl.abs(c)
    return c


def _bwd_kernel(
    h_ptr, g_ptr, gs_ptr, dh_ptr, part_ptr, a_ptr, b_ptr, set_ptr, cin_ptr, cout_ptr,
    n_rows, n_cols, stride_a, stride_b, t_max, big, ROWS_PER_PROG,
    P_DEG: tl.constexpr, Q_DEG: tl.constexpr, DEN_A: tl.constexpr, COEF_MODE: tl.constexpr,
    SCALE_PER_COL: tl.constexpr, POSITIVE_ONLY: tl.constexpr, NEED_DH: tl.constexpr, NEED_PARAMS: tl.constexpr,
    ABS_GRAD: tl.constexpr, N_PAR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # N_PAR = P_DEG + Q_DEG + 3 parameters. A program owns BLOCK_N latents and ROWS_PER_PROG rows, walked BLOCK_M rows at a time. The
    # gradient of each parameter (a_0..a_p, b_1..b_q, C_in, C_out) is accumulated elementwise in a
    # [BLOCK_M, BLOCK_N] tile (a tuple of them is the loop state), and reduced over rows once at the
    # end into this program's partial sums: no reduction, shuffle or atomic inside the loop.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols

    if SCALE_PER_COL:
        c_in = tl.load(cin_ptr + cols, mask=col_ok, other=1.0)[None, :]
        c_out = tl.load(cout_ptr + cols, mask=col_ok, other=1.0)[None, :]
    else:
        c_in = tl.load(cin_ptr)
        c_out = tl.load(cout_ptr)
    inv_c_in = 1.0 / c_in
    if COEF_MODE == 0:
        a_off = 0
        b_off = 0
    elif COEF_MODE == 1:
        a_off = cols * stride_a
        b_off = cols * stride_b
    else:
        sets = tl.load(set_ptr + cols, mask=col_ok, other=0)
        a_off = sets * stride_a
        b_off = sets * stride_b

    # Coefficients, loaded once: scalars (shared) or [1, BLOCK_N] rows (per latent / group).
    a_c = ()
    for i in tl.static_range(P_DEG + 1):
        a_c = a_c + (_coef(a_ptr, a_off + i, col_ok, COEF_MODE, False),)
    b_c = ()
    for j in tl.static_range(Q_DEG):
        b_c = b_c + (_coef(b_ptr, b_off + j, col_ok, COEF_MODE, DEN_A),)

    if ABS_GRAD:  # dL/d(column sums of |y|): adds dL/dsum_j * sign(y) to dL/dy
        g_sum = tl.load(gs_ptr + cols, mask=col_ok, other=0.0)[None, :]

    acc = ()
    if NEED_PARAMS:
        for _ in tl.static_range(N_PAR):
            acc = acc + (tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32),)

    row_start = pid_m * ROWS_PER_PROG
    row_stop = tl.minimum(row_start + ROWS_PER_PROG, n_rows)
    # The next tile's h and dL/dphi are loaded while this one is computed (a register double
    # buffer), so that memory latency overlaps the arithmetic.
    rows = row_start + tl.arange(0, BLOCK_M)
    mask = (rows[:, None] < row_stop) & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    h_next = tl.load(h_ptr + offs, mask=mask, other=0.0)
    g_next = tl.load(g_ptr + offs, mask=mask, other=0.0)
    for r0 in range(row_start, row_stop, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_stop) & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        h = h_next.to(tl.float32)
        g = g_next.to(tl.float32)
        mask_next = ((rows[:, None] + BLOCK_M) < row_stop) & col_ok[None, :]
        h_next = tl.load(h_ptr + offs + BLOCK_M * n_cols, mask=mask_next, other=0.0)
        g_next = tl.load(g_ptr + offs + BLOCK_M * n_cols, mask=mask_next, other=0.0)

        t_raw = h * inv_c_in
        inside = (t_raw >= -t_max) & (t_raw <= t_max)
        t = tl.where(t_raw > t_max, t_max, t_raw)
        t = tl.where(t < -t_max, -t_max, t)

        # P and P' by Horner.
        num = a_c[P_DEG] + 0.0 * t
        dnum = 0.0 * t
        for i2 in tl.static_range(P_DEG):
            dnum = dnum * t + num
            num = num * t + a_c[P_DEG - 1 - i2]
        if Q_DEG > 0:
            # S(u) = c_1 + c_2 u + ... + c_q u^(q-1) and S'(u); B: u = t, c = b, Q = 1 + |u S|;
            # A: u = |t|, c = |b|, Q = 1 + u S.
            if DEN_A:
                u = tl.abs(t)
            else:
                u = t
            s = b_c[Q_DEG - 1] + 0.0 * t
            ds = 0.0 * t
            for j2 in tl.static_range(Q_DEG - 1):
                ds = ds * u + s
                s = s * u + b_c[Q_DEG - 2 - j2]
            su = s * u
            dsu = s + u * ds  # d(u S)/du
            if DEN_A:
                inv_den = 1.0 / (1.0 + su)
                sgn = tl.where(t > 0, 1.0, tl.where(t < 0, -1.0, 0.0))  # du/dt
            else:
                inv_den = 1.0 / (1.0 + tl.abs(su))
                sgn = tl.where(su > 0, 1.0, tl.where(su < 0, -1.0, 0.0))  # d|su|/dsu
            dden = sgn * dsu
            r = num * inv_den
        else:
            u = t
            sgn = 0.0 * t
            inv_den = 1.0 + 0.0 * t
            dden = 0.0 * t
            r = num
        y = c_out * r
        if ABS_GRAD:  # sign of the result as stored: clamped, rounded to h's dtype, masked
            y_st = tl.where(y > big, big, tl.where(y < -big, -big, y)).to(h_ptr.dtype.element_ty).to(tl.float32)
            if POSITIVE_ONLY:
                y_st = y_st * tl.where(h > 0, 1.0, 0.0)
            g = g + tl.where(mask, g_sum * tl.where(y_st > 0, 1.0, tl.where(y_st < 0, -1.0, 0.0)), 0.0)  # (not padding)
        g = tl.where((y <= big) & (y >= -big), g, 0.0)  # the cast-back clamp passes no gradient
        if POSITIVE_ONLY:  # the mask [h > 0] passes dL/dz where it is 1 and has no gradient itself
            g = g * tl.where(h > 0, 1.0, 0.0)
        w = g * c_out * inv_den  # dL/dP
        gt = tl.where(inside, w * (dnum - r * dden), 0.0)  # dL/dt (zero where the clamp is active)
        if NEED_DH:
            tl.store(dh_ptr + offs, (gt * inv_c_in).to(dh_ptr.dtype.element_ty), mask=mask)
        if NEED_PARAMS:
            new = ()
            pw = 1.0 + 0.0 * t
            for i in tl.static_range(P_DEG + 1):  # dL/da_i = w t^i
                new = new + (acc[i] + w * pw,)
                pw = pw * t
            # B: dL/db_j = -w r sign(su) t^j; A: -w r |t|^j (sign(b_j) is applied on the host).
            if DEN_A:
                base = -w * r
            else:
                base = -w * r * sgn
            pw = u
            for j in tl.static_range(Q_DEG):
                new = new + (acc[P_DEG + 1 + j] + base * pw,)
                pw = pw * u
            new = new + (acc[N_PAR - 2] - gt * t_raw * inv_c_in,)  # dL/dC_in (t = h / C_in)
            new = new + (acc[N_PAR - 1] + g * r,)  # dL/dC_out
            acc = new

    if NEED_PARAMS:
        for k in tl.static_range(N_PAR):
            part_offs = (pid_m * N_PAR + k).to(tl.int64) * n_cols + cols
            tl.store(part_ptr + part_offs, tl.sum(acc[k], axis=0), mask=col_ok)


def _kernel_mode() -> str | tuple[int, int]:
    """'autotune', or fixed (forward, backward) indices into FWD_CONFIGS / BWD_CONFIGS: the first
    ones under the interpreter, or those named by RSAE_KERNEL_CONFIG="i,j" (tests, tuning)."""
    if interpreting():
        return (0, 0)
    fixed = os.environ.get("RSAE_KERNEL_CONFIG")
    if fixed:
        i, j = (int(v) for v in fixed.split(","))
        return (i, j)
    return "autotune"


@functools.lru_cache(maxsize=None)
def _jit():
    jitted = jit_functions(globals(), ("_coef", "_fwd_kernel", "_bwd_kernel"))
    return jitted["_fwd_kernel"], jitted["_bwd_kernel"]


@functools.lru_cache(maxsize=None)
def _kernels(mode: str | tuple[int, int] = "autotune"):
    """(forward, backward) Triton kernels, built on first use: autotuned over the tile shapes (once
    per problem shape), or with the fixed tile shapes `mode` names."""
    fwd, bwd = _jit()
    if mode != "autotune":
        return _Fixed(fwd, FWD_CONFIGS[mode[0]]), _Fixed(bwd, BWD_CONFIGS[mode[1]])
    key = ["n_cols", "P_DEG", "Q_DEG", "DEN_A", "COEF_MODE", "SCALE_PER_COL", "POSITIVE_ONLY"]
    fwd = triton.autotune([triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in FWD_CONFIGS],
                          key=key + ["ABS_SUM"])(fwd)
    bwd = triton.autotune([triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in BWD_CONFIGS],
                          key=key + ["NEED_DH", "NEED_PARAMS", "ABS_GRAD"])(bwd)
    return fwd, bwd


class _Fixed:
    """A kernel launched with one fixed tile shape, called like an autotuned one."""

    def __init__(self, kernel, config):
        self.kernel, (self.m, self.n, self.w) = kernel, config

    def __getitem__(self, grid):
        meta = {"BLOCK_M": self.m, "BLOCK_N": self.n}
        launch = self.kernel[grid(meta) if callable(grid) else grid]
        return lambda *args, **kw: launch(*args, **kw, **meta, num_warps=self.w)


def _check_device(h: Tensor) -> None:
    if not h.is_cuda and not interpreting():
        raise RuntimeError("rational_gate_triton on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is first imported")


# --- the operators ------------------------------------------------------------------------------------
# Two torch.library custom ops (forward, backward) tied together by `register_autograd`: torch.compile
# sees them as single opaque operators with known output shapes (the fake implementations) and keeps
# the whole training step in one graph around them, instead of breaking the graph at the kernel.
# Both take h as a contiguous [rows, d] matrix; `rational_gate_triton` reshapes around them.


def _rows_per_program(n_rows: int, d: int) -> int:
    """Rows each backward program reduces: enough programs to fill a GPU, few partial sums."""
    progs = max(1, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(d, 128)))  # with 128 latents per program
    return max(ROW_QUANTUM, triton.cdiv(triton.cdiv(n_rows, progs), ROW_QUANTUM) * ROW_QUANTUM)


def _fwd_rows_per_program(n_rows: int, d: int) -> int:
    """Rows each forward program sums |y| over: a multiple of every forward tile's BLOCK_M (so
    the number of partial sums does not depend on the tile autotuning picks), enough programs to
    fill a GPU."""
    quantum = max(m for m, _, _ in FWD_CONFIGS)
    progs = max(1, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(d, 128)))
    return max(quantum, triton.cdiv(triton.cdiv(n_rows, progs), quantum) * quantum)


def _big(dtype: torch.dtype) -> float:
    """The clamp of the result before the cast back to h's dtype (none for float32)."""
    return float(torch.finfo(dtype).max) if dtype != torch.float32 else float("inf")


def _coef_mode(a: Tensor, set_index: Tensor | None) -> int:
    return 0 if a.shape[0] == 1 else (2 if set_index is not None else 1)


@torch.library.custom_op("rsae::rational_gate", mutates_args=())
def _gate_op(h: Tensor, a: Tensor, b: Tensor, c_in: Tensor, c_out: Tensor, set_index: Tensor | None,
             denominator: str, t_max: float, positive_only: bool, abs_sum: bool) -> tuple[Tensor, Tensor]:
    """(y, the column sums of |y| as float32 [d] with `abs_sum`, else an empty tensor)."""
    n_rows, d = h.shape
    y = torch.empty_like(h)
    rows_per_prog = _fwd_rows_per_program(n_rows, d) if abs_sum else 0
    n_sum_progs = triton.cdiv(n_rows, rows_per_prog) if abs_sum else 0
    part = h.new_empty((n_sum_progs, d), dtype=torch.float32) if abs_sum else h.new_empty(0)
    fwd, _ = _kernels(_kernel_mode())
    if n_rows > 0 and d > 0:
        grid = lambda meta: (triton.cdiv(d, meta["BLOCK_N"]),  # noqa: E731
                             n_sum_progs if abs_sum else triton.cdiv(n_rows, meta["BLOCK_M"]))
        fwd[grid](
            h, y, part if abs_sum else y, a, b, set_index if set_index is not None else a, c_in, c_out, n_rows, d,
            a.stride(0), b.stride(0), t_max, _big(h.dtype), rows_per_prog, P_DEG=a.shape[1] - 1, Q_DEG=b.shape[1],
            DEN_A=denominator == "A", COEF_MODE=_coef_mode(a, set_index), SCALE_PER_COL=c_in.numel() > 1,
            POSITIVE_ONLY=positive_only, ABS_SUM=abs_sum,
        )
    if not abs_sum:
        return y, part
    return y, (part.sum(0) if n_rows > 0 else torch.zeros(d, dtype=torch.float32, device=h.device))


@_gate_op.register_fake
def _gate_op_fake(h, a, b, c_in, c_out, set_index, denominator, t_max, positive_only, abs_sum):
    sums = h.new_empty((h.shape[1],), dtype=torch.float32) if abs_sum else h.new_empty(0)
    return torch.empty_like(h), sums


@torch.library.custom_op("rsae::rational_gate_backward", mutates_args=())
def _gate_backward_op(grad: Tensor, grad_sum: Tensor | None, h: Tensor, a: Tensor, b: Tensor, c_in: Tensor,
                      c_out: Tensor, set_index: Tensor | None, denominator: str, t_max: float, positive_only: bool,
                      need_h: bool, need_params: bool) -> tuple[Tensor, Tensor]:
    """(dL/dh or an empty tensor, per-latent gradient sums [p + q + 3, d] float32 or an empty tensor):
    rows a_0..a_p, b_1..b_q (before sign(b) for denominator A), C_in, C_out. `grad_sum`: dL/d of
    the column sums of |y| (float32 [d]), or None."""
    n_rows, d = h.shape
    n_par = a.shape[1] + b.shape[1] + 2
    rows_per_prog = _rows_per_program(n_rows, d)
    n_row_progs = triton.cdiv(n_rows, rows_per_prog)
    dh = torch.empty_like(h) if need_h else h.new_empty(0)
    part = h.new_empty((n_row_progs, n_par, d), dtype=torch.float32) if need_params else h.new_empty(0)
    _, bwd = _kernels(_kernel_mode())
    if n_rows > 0 and d > 0 and (need_h or need_params):
        grid = lambda meta: (triton.cdiv(d, meta["BLOCK_N"]), n_row_progs)  # noqa: E731
        bwd[grid](
            h, grad, grad_sum if grad_sum is not None else grad, dh if need_h else h, part if need_params else h,
            a, b, set_index if set_index is not None else a, c_in, c_out, n_rows, d, a.stride(0), b.stride(0), t_max,
            _big(h.dtype), ROWS_PER_PROG=rows_per_prog, P_DEG=a.shape[1] - 1, Q_DEG=b.shape[1],
            DEN_A=denominator == "A", COEF_MODE=_coef_mode(a, set_index), SCALE_PER_COL=c_in.numel() > 1,
            POSITIVE_ONLY=positive_only, NEED_DH=need_h, NEED_PARAMS=need_params, ABS_GRAD=grad_sum is not None,
            N_PAR=n_par,
        )
    if not need_params:
        return dh, part
    if n_rows == 0:
        return dh, torch.zeros(n_par, d, dtype=torch.float32, device=h.device)
    return dh, part.sum(0)


@_gate_backward_op.register_fake
def _gate_backward_op_fake(grad, grad_sum, h, a, b, c_in, c_out, set_index, denominator, t_max, positive_only,
                           need_h, need_params):
    dh = torch.empty_like(h) if need_h else h.new_empty(0)
    n_par = a.shape[1] + b.shape[1] + 2
    tot = h.new_empty((n_par, h.shape[1]), dtype=torch.float32) if need_params else h.new_empty(0)
    return dh, tot


def _setup_context(ctx, inputs, output):
    h, a, b, c_in, c_out, set_index, denominator, t_max, positive_only, abs_sum = inputs
    ctx.save_for_backward(h, a, b, c_in, c_out, set_index)
    ctx.meta = (denominator, t_max, positive_only, abs_sum)


def _backward(ctx, grad, grad_sum):
    h, a, b, c_in, c_out, set_index = ctx.saved_tensors
    denominator, t_max, positive_only, abs_sum = ctx.meta
    need_h, need_a, need_b, need_cin, need_cout = ctx.needs_input_grad[:5]
    need_params = need_a or need_b or need_cin or need_cout
    grad = torch.zeros_like(h) if grad is None else grad.contiguous()
    grad_sum = grad_sum.float().contiguous() if abs_sum and grad_sum is not None else None
    dh, tot = _gate_backward_op(grad, grad_sum, h, a, b, c_in, c_out, set_index, denominator, t_max,
                                positive_only, need_h, need_params)
    ga = gb = gcin = gcout = None
    if need_params:  # per-latent sums -> per coefficient set / scale ([n_par, d] values, not per element)
        p1, q = a.shape[1], b.shape[1]
        per_latent = tot[: p1 + q].t()  # [d, p + 1 + q]
        if a.shape[0] == 1:
            per_set = per_latent.sum(0, keepdim=True)
        elif set_index is None:
            per_set = per_latent
        else:  # group: add up each set's latents
            per_set = per_latent.new_zeros(a.shape[0], p1 + q).index_add(0, set_index.long(), per_latent)
        ga = per_set[:, :p1].contiguous() if need_a else None
        if need_b:
            gb = per_set[:, p1:].contiguous()
            if denominator == "A":
                gb = gb * torch.sign(b)
        scale_per_col = c_in.numel() > 1
        if need_cin:
            gcin = tot[p1 + q] if scale_per_col else tot[p1 + q].sum().reshape(1)
        if need_cout:
            gcout = tot[p1 + q + 1] if scale_per_col else tot[p1 + q + 1].sum().reshape(1)
    return (dh if need_h else None), ga, gb, gcin, gcout, None, None, None, None, None


_gate_op.register_autograd(_backward, setup_context=_setup_context)


def rational_gate_triton(
    h: Tensor,
    a: Tensor,
    b: Tensor,
    c_in: Tensor,
    c_out: Tensor,
    *,
    denominator: str = "B",
    set_index: Tensor | None = None,
    t_max: float = T_MAX,
    positive_only: bool = False,
    abs_colsum: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """phi(h) = c_out * r(h / c_in) along the last dimension of h, fused (see the module docstring);
    with `positive_only`, phi(h) * [h > 0] (the ReLU-masked gate in the same pass). With
    `abs_colsum`, (phi, sum of |phi| over all but the last dimension, float32 [d]): an L1 penalty
    on phi read from these sums costs no pass of its own, forward or backward (the sums' gradient
    joins phi's inside the backward kernel).

    h: [..., d] in float32, bfloat16 or float16 (the result has h's dtype).
    a: [n_sets, p + 1] (or [p + 1]); b: [n_sets, q] (or [q]); n_sets = 1, or d without
    `set_index`, or any number with `set_index` ([d] integer: latent j uses set set_index[j]).
    c_in, c_out: positive scales, one value or [d] each.
    Gradients reach h, a, b, c_in and c_out (in their own dtypes) through autograd."""
    if triton is None:
        raise RuntimeError("rational_gate_triton needs triton (pip install triton)")
    if h.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"rational_gate_triton supports {SUPPORTED_DTYPES}, got {h.dtype}")
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator!r}")
    _check_device(h)
    d = h.shape[-1]
    a2 = a.reshape(1, -1) if a.ndim == 1 else a
    b2 = b.reshape(1, -1) if b.ndim == 1 else b
    if a2.ndim != 2 or b2.ndim != 2 or a2.shape[0] != b2.shape[0] or a2.shape[1] < 1:
        raise ValueError(f"coefficients must be [n, p+1] and [n, q], got {list(a.shape)} and {list(b.shape)}")
    n_sets = a2.shape[0]
    if set_index is not None:
        if set_index.shape != (d,):
            raise ValueError(f"set_index must have shape [{d}], got {list(set_index.shape)}")
        set_index = set_index.to(device=h.device, dtype=torch.int32)
        if n_sets == 1:
            set_index = None
    elif n_sets not in (1, d):
        raise ValueError(f"{n_sets} coefficient sets need a set_index for a last dimension of {d}")
    c_in, c_out = c_in.reshape(-1), c_out.reshape(-1)
    if c_in.numel() not in (1, d) or c_out.numel() != c_in.numel():
        raise ValueError(f"c_in / c_out must both have 1 or {d} values, got {c_in.numel()} and {c_out.numel()}")
    # Differentiable torch ops outside the kernel (as the gate does them): float32 coefficients and
    # scales, C_in clamped to the smallest normal float32. Autograd casts the gradients back.
    with torch.autocast(device_type=h.device.type, enabled=False):
        a32 = a2.to(torch.float32).contiguous()
        b32 = b2.to(torch.float32).contiguous()
        if b32.shape[1] == 0:
            b32 = b32.new_zeros((n_sets, 0))
        cin32 = c_in.to(torch.float32).clamp_min(torch.finfo(torch.float32).tiny).contiguous()
        cout32 = c_out.to(torch.float32).contiguous()
        h2 = h.reshape(-1, d).contiguous()
        y, sums = _gate_op(h2, a32, b32, cin32, cout32, set_index, denominator, float(t_max), bool(positive_only),
                           bool(abs_colsum))
        return (y.view(h.shape), sums) if abs_colsum else y.view(h.shape)
