"""The torch operators around the fused rational-gate kernels: `rsae::rational_gate` (forward) and
`rsae::rational_gate_backward`, two torch.library custom ops with fake implementations (so that
torch.compile sees single opaque operators with known output shapes and keeps the whole training
step in one graph around them), tied together by `register_autograd`. They launch the kernels of
`rsae.rational.kernel_triton` on a contiguous [rows, d] matrix, size the backward's per-program
partial sums, and reduce the per-latent gradient sums to each coefficient set and scale. The
checked, reshaping entry point is `rsae.rational.kernel.rational_gate_triton`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rsae.rational.kernel_triton import FWD_CONFIGS, kernel_mode, kernels, triton

ROW_QUANTUM = 8  # rows per backward program are a multiple of this
TARGET_PROGRAMS = 2048  # backward programs to aim at (several waves of several per multiprocessor)

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
def gate_op(h: Tensor, a: Tensor, b: Tensor, c_in: Tensor, c_out: Tensor, set_index: Tensor | None,
            denominator: str, t_max: float, positive_only: bool, abs_sum: bool) -> tuple[Tensor, Tensor]:
    """(y, the column sums of |y| as float32 [d] with `abs_sum`, else an empty tensor)."""
    n_rows, d = h.shape
    y = torch.empty_like(h)
    rows_per_prog = _fwd_rows_per_program(n_rows, d) if abs_sum else 0
    n_sum_progs = triton.cdiv(n_rows, rows_per_prog) if abs_sum else 0
    part = h.new_empty((n_sum_progs, d), dtype=torch.float32) if abs_sum else h.new_empty(0)
    fwd, _ = kernels(kernel_mode())
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


@gate_op.register_fake
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
    _, bwd = kernels(kernel_mode())
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


gate_op.register_autograd(_backward, setup_context=_setup_context)
