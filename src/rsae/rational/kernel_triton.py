"""The Triton source of the fused rational gate: the forward and backward kernel bodies, their tile
shapes, and how they are built on first use (autotuned over the tile shapes on a GPU, or one fixed
shape under the interpreter or `RSAE_KERNEL_CONFIG="i,j"`). The kernels are plain functions here,
turned into Triton kernels by `jit_kernels`, so that importing this module costs nothing and works
without Triton (`triton` is then None). The torch operators that launch them are in
`rsae.rational.kernel_ops`; what they compute is described in `rsae.rational.kernel`.
"""

from __future__ import annotations

import functools
import os

from rsae.triton_jit import interpreting, jit_functions

try:  # Triton is optional: without it `use_kernel` is False and the reference runs
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import problem means "no kernel"
    triton = tl = None

# Tile shapes (rows, latents, warps). The first is used by the interpreter; on a GPU each kernel
# picks the fastest once per problem shape (triton.autotune). The backward's tiles put a few rows
# of one or two latents in each thread (latents across the threads), so that its p + q + 3
# gradient accumulators stay in registers; `python -m rsae.bench rational_kernel` shows every shape
# is free of register spills on sm_90 up to degrees (9, 8).
FWD_CONFIGS = ((16, 128, 4), (32, 128, 8), (8, 256, 4), (32, 64, 4), (32, 256, 8), (64, 128, 8), (16, 256, 4))
BWD_CONFIGS = ((4, 128, 4), (4, 256, 8), (2, 256, 4), (4, 64, 2), (8, 128, 4), (8, 256, 8), (8, 64, 2))


# --- the kernels ----------------------------------------------------------------------------------
# Plain functions, turned into Triton kernels on first use (`kernels`), so that importing this module
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

    c_in, c_out = _scales(cin_ptr, cout_ptr, cols, col_ok, SCALE_PER_COL)
    a_off, b_off = _coef_offsets(set_ptr, cols, col_ok, stride_a, stride_b, COEF_MODE)

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


def _scales(cin_ptr, cout_ptr, cols, col_ok, SCALE_PER_COL: tl.constexpr):
    """(C_in, C_out) for a program's latents `cols`: scalars, or [1, BLOCK_N] rows (one per latent)."""
    if SCALE_PER_COL:
        c_in = tl.load(cin_ptr + cols, mask=col_ok, other=1.0)[None, :]
        c_out = tl.load(cout_ptr + cols, mask=col_ok, other=1.0)[None, :]
    else:
        c_in = tl.load(cin_ptr)
        c_out = tl.load(cout_ptr)
    return c_in, c_out


def _coef_offsets(set_ptr, cols, col_ok, stride_a, stride_b, COEF_MODE: tl.constexpr):
    """Offsets of a_0 and b_1 in the coefficient arrays for a program's latents `cols`: 0 (one shared
    set), each latent's own row, or the row of each latent's set (group sharing)."""
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
    return a_off, b_off


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

    c_in, c_out = _scales(cin_ptr, cout_ptr, cols, col_ok, SCALE_PER_COL)
    inv_c_in = 1.0 / c_in
    a_off, b_off = _coef_offsets(set_ptr, cols, col_ok, stride_a, stride_b, COEF_MODE)

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


def kernel_mode() -> str | tuple[int, int]:
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
def jit_kernels():
    jitted = jit_functions(globals(), ("_coef", "_scales", "_coef_offsets", "_fwd_kernel", "_bwd_kernel"))
    return jitted["_fwd_kernel"], jitted["_bwd_kernel"]


@functools.lru_cache(maxsize=None)
def kernels(mode: str | tuple[int, int] = "autotune"):
    """(forward, backward) Triton kernels, built on first use: autotuned over the tile shapes (once
    per problem shape), or with the fixed tile shapes `mode` names."""
    fwd, bwd = jit_kernels()
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

