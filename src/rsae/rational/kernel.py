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

The Triton kernel bodies and tile shapes are in `rsae.rational.kernel_triton`, the torch.library
operators and their autograd in `rsae.rational.kernel_ops`; this module is the entry point.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from rsae.rational.function import DENOMINATORS, T_MAX
from rsae.rational.kernel_ops import gate_op
from rsae.rational.kernel_triton import triton
from rsae.triton_jit import interpreting

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

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


def _check_device(h: Tensor) -> None:
    if not h.is_cuda and not interpreting():
        raise RuntimeError("rational_gate_triton on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is first imported")



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
        y, sums = gate_op(h2, a32, b32, cin32, cout32, set_index, denominator, float(t_max), bool(positive_only),
                           bool(abs_colsum))
        return (y.view(h.shape), sums) if abs_colsum else y.view(h.shape)
