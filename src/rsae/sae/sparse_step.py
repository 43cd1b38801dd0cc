"""TopK's sparse training step: only the k selected latents of each row are touched after the
encoder GEMM, forward and backward (the kernels of `rsae.sae.sparse_kernel`).

Dense, a TopK step runs four [batch, d_sae]-sized GEMMs besides the encoder's: the decoder, its
input and weight gradients, and the encoder's weight gradient, all over codes that are zero but
for k entries per row, plus the scatters that build those dense codes. Here:

* `topk_encode`: h = (x - b_dec) @ W_enc + b_enc (one GEMM), the top-k of each row, the ReLU'd
  values, and the entries sorted by latent (shared by both weight gradients). Backward: W_enc's
  gradient from the selected entries only (`scatter_rows` over the encoder's input), b_enc's as a
  per-latent sum, b_dec's as -W_enc @ (that sum). h comes out without a gradient: a step that also
  needs the gradient of all of h (AuxK over every column: many dead latents) runs the dense
  encoder and `sparse_decode` alone.
* `sparse_decode`: x_hat = sum_i values_i W_dec[idx_i] + b_dec in float32 (`gather_rows`);
  backward: the values' gradient (`gather_dots`), W_dec's (`scatter_rows` over dL/dx_hat), b_dec's.

Both compute in the autocast dtype when autocast is on (W cast once per step, as autocast does for
a dense GEMM), else in the weights' dtype, and accumulate in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rsae.sae import fast, sparse_kernel
from rsae.sae.sparse_kernel import gather_dots_op, gather_rows_op, scatter_rows_op


def applies(x: Tensor) -> bool:
    """Whether the kernels run on x's device (CUDA with Triton, or Triton's interpreter)."""
    return fast.enabled() and sparse_kernel.supported(x)


def _dtype(x: Tensor, w: Tensor) -> torch.dtype:
    return fast._autocast_dtype(x.device.type) or torch.promote_types(x.dtype, w.dtype)


class _TopKEncoder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_enc, b_enc, b_dec, k, dtype):
        xc = (x - b_dec).to(dtype)
        h = torch.addmm(b_enc.to(dtype), xc, w_enc.to(dtype))
        indices = fast.topk_select(h, k)[1]
        values = h.gather(-1, indices).relu()
        lat, order = sparse_kernel.sort_entries(indices)
        ctx.save_for_backward(xc, w_enc, values, indices, lat, order)
        ctx.mark_non_differentiable(indices, h, lat, order)
        ctx.x_dtype = x.dtype
        return values, indices, h, lat, order

    @staticmethod
    def backward(ctx, dvalues, *_):
        xc, w_enc, values, indices, lat, order = ctx.saved_tensors
        need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
        dv = torch.where(values > 0, dvalues, 0).to(xc.dtype)  # the ReLU's gradient
        dx = dw = dbe = dbd = None
        if need_w:  # [d_sae, d_in]: W_enc's own memory layout when it is stored transposed
            dw = scatter_rows_op(dv, lat, order, xc, w_enc.shape[1]).t().to(w_enc.dtype)
        if need_be or need_bd:
            col = torch.zeros(w_enc.shape[1], dtype=torch.float32, device=dv.device)
            col.index_add_(0, indices.flatten(), dv.flatten().float())
            dbe = col.to(w_enc.dtype) if need_be else None
            if need_bd:
                dbd = -(w_enc.float() @ col)
        if need_x:
            dx = gather_rows_op(dv, indices, w_enc.to(xc.dtype).t()).to(ctx.x_dtype)
        return dx, dw, dbe, dbd, None, None


class _SparseDecoder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, lat, order, w_dec, b_dec, dtype):
        w = w_dec.to(dtype)
        ctx.save_for_backward(values, indices, lat, order, w)
        ctx.w_dtype, ctx.b_dtype = w_dec.dtype, b_dec.dtype
        return gather_rows_op(values.to(dtype), indices, w) + b_dec.float()

    @staticmethod
    def backward(ctx, grad):
        values, indices, lat, order, w = ctx.saved_tensors
        need_v, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        g = grad.to(w.dtype)
        dv = gather_dots_op(g, indices, w).to(values.dtype) if need_v else None
        dw = scatter_rows_op(values.to(w.dtype), lat, order, g, w.shape[0]).to(ctx.w_dtype) if need_w else None
        db = grad.float().sum(0).to(ctx.b_dtype) if need_b else None
        return dv, None, None, None, dw, db, None


def topk_encode(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int
                ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
    """(values [B, k] after the ReLU, latent indices [B, k], h without gradient, the entries sorted
    by latent) for the k largest pre-activations of each row."""
    dtype = _dtype(x, w_enc)  # (read before autocast is switched off around the function)
    with torch.autocast(device_type=x.device.type, enabled=False):
        values, indices, h, lat, order = _TopKEncoder.apply(x, w_enc, b_enc, b_dec, k, dtype)
    return values, indices, h, (lat, order)


def sparse_decode(values: Tensor, indices: Tensor, entries: tuple[Tensor, Tensor] | None, w_dec: Tensor,
                  b_dec: Tensor) -> Tensor:
    """b_dec + sum_i values[:, i] * w_dec[indices[:, i]], float32 [B, d_in] (`entries` from
    `topk_encode`, or None to sort them here)."""
    if entries is None:
        entries = sparse_kernel.sort_entries(indices)
    dtype = _dtype(values, w_dec)
    with torch.autocast(device_type=values.device.type, enabled=False):
        return _SparseDecoder.apply(values, indices, *entries, w_dec, b_dec, dtype)
