"""TopK's sparse training step: only the k selected latents of each row are touched after the
encoder GEMM, forward and backward (the kernels of `rsae.sae.sparse_kernel`).

Dense, a TopK step runs four [batch, d_sae]-sized GEMMs besides the encoder's: the decoder, its
input and weight gradients, and the encoder's weight gradient, all over codes that are zero but
for k entries per row, plus the scatters that build those dense codes. Here:

* `topk_encode`: h = (x - b_dec) @ W_enc + b_enc (one GEMM), the top-k of each row, the ReLU'd
  values, and the entries sorted by latent (shared by both weight gradients). Backward: W_enc's
  gradient from the selected entries only (`scatter_rows` over the encoder's input), b_enc's as a
  per-latent sum, b_dec's as -W_enc @ (that sum). h comes out without a gradient: a step that also
  needs the gradient of all of h (AuxK over every column) runs the dense encoder and
  `sparse_decode` alone.
* `sparse_decode`: x_hat = sum_i values_i W_dec[idx_i] + b_dec in float32 (`gather_rows`);
  backward: the values' gradient (`gather_dots`), W_dec's (`scatter_rows` over dL/dx_hat), b_dec's.
* Both take a few extra dense columns for AuxK over the dead latents (`aux_cols`): the encoder also
  returns their pre-activations [B, C] with a gradient, the decoder also decodes codes over them
  (without b_dec). Their weight gradients are added in place to the rows of the sparse ones:
  separately, each would be a dense [d_sae, d_in] gradient for autograd to add.

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
    def forward(ctx, x, w_enc, b_enc, b_dec, k, dtype, aux_cols):
        xc = (x - b_dec).to(dtype)
        h = torch.addmm(b_enc.to(dtype), xc, w_enc.to(dtype))
        indices = fast.topk_select(h, k)[1]
        values = h.gather(-1, indices).relu()
        lat, order = sparse_kernel.sort_entries(indices)
        if aux_cols is None:
            h_aux = h.new_empty((0,))
        else:  # the extra columns' pre-activations: [B, C], differentiable
            h_aux = torch.addmm(b_enc[aux_cols].to(dtype), xc, w_enc[:, aux_cols].to(dtype))
        ctx.save_for_backward(xc, w_enc, values, indices, lat, order, aux_cols)
        ctx.mark_non_differentiable(indices, h, lat, order)
        ctx.x_dtype = x.dtype
        return values, indices, h, lat, order, h_aux

    @staticmethod
    def backward(ctx, dvalues, _di, _dh, _dl, _do, dh_aux):
        xc, w_enc, values, indices, lat, order, cols = ctx.saved_tensors
        need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
        dv = torch.where(values > 0, dvalues, 0).to(xc.dtype)  # the ReLU's gradient
        aux = cols is not None and dh_aux is not None
        dh_aux = dh_aux.to(xc.dtype) if aux else None
        dx = dw = dbe = dbd = None
        if need_w:  # [d_sae, d_in]: W_enc's own memory layout when it is stored transposed
            dw = scatter_rows_op(dv, lat, order, xc, w_enc.shape[1])
            if aux:
                dw.index_add_(0, cols, (dh_aux.t() @ xc).float())
            dw = dw.t().to(w_enc.dtype)
        if need_be or need_bd:
            col = torch.zeros(w_enc.shape[1], dtype=torch.float32, device=dv.device)
            col.index_add_(0, indices.flatten(), dv.flatten().float())
            if aux:
                col.index_add_(0, cols, dh_aux.float().sum(0))
            dbe = col.to(w_enc.dtype) if need_be else None
            if need_bd:  # h and h_aux both hold -b_dec @ W_enc: through the same column sums
                dbd = -(w_enc.float() @ col)
        if need_x:
            dx = gather_rows_op(dv, indices, w_enc.to(xc.dtype).t())
            if aux:
                dx = dx + (dh_aux @ w_enc[:, cols].to(xc.dtype).t()).float()
            dx = dx.to(ctx.x_dtype)
        return dx, dw, dbe, dbd, None, None, None


class _SparseDecoder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, lat, order, w_dec, b_dec, dtype, z_aux, aux_cols):
        w = w_dec.to(dtype)
        ctx.save_for_backward(values, indices, lat, order, w, z_aux, aux_cols)
        ctx.w_dtype, ctx.b_dtype = w_dec.dtype, b_dec.dtype
        x_hat = gather_rows_op(values.to(dtype), indices, w) + b_dec.float()
        e_hat = x_hat.new_empty((0,)) if aux_cols is None else (z_aux.to(dtype) @ w[aux_cols]).float()
        return x_hat, e_hat

    @staticmethod
    def backward(ctx, grad, grad_aux):
        values, indices, lat, order, w, z_aux, cols = ctx.saved_tensors
        need_v, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        aux = cols is not None and grad_aux is not None
        g = grad.to(w.dtype)
        g_aux = grad_aux.to(w.dtype) if aux else None
        dv = gather_dots_op(g, indices, w).to(values.dtype) if need_v else None
        dw = dz_aux = None
        if need_w:
            dw = scatter_rows_op(values.to(w.dtype), lat, order, g, w.shape[0])
            if aux:
                dw.index_add_(0, cols, (z_aux.to(w.dtype).t() @ g_aux).float())
            dw = dw.to(ctx.w_dtype)
        if aux and ctx.needs_input_grad[7]:
            dz_aux = (g_aux @ w[cols].t()).to(z_aux.dtype)
        db = grad.float().sum(0).to(ctx.b_dtype) if need_b else None
        return dv, None, None, None, dw, db, None, dz_aux, None


def topk_encode(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, aux_cols: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor], Tensor | None]:
    """(values [B, k] after the ReLU, latent indices [B, k], h without gradient, the entries sorted
    by latent, and with `aux_cols` the pre-activations of those latents [B, C] with their gradient)
    for the k largest pre-activations of each row."""
    dtype = _dtype(x, w_enc)  # (read before autocast is switched off around the function)
    with torch.autocast(device_type=x.device.type, enabled=False):
        values, indices, h, lat, order, h_aux = _TopKEncoder.apply(x, w_enc, b_enc, b_dec, k, dtype, aux_cols)
    return values, indices, h, (lat, order), (h_aux if aux_cols is not None else None)


def sparse_decode(values: Tensor, indices: Tensor, entries: tuple[Tensor, Tensor] | None, w_dec: Tensor,
                  b_dec: Tensor, aux: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
    """(b_dec + sum_i values[:, i] * w_dec[indices[:, i]], float32 [B, d_in]; with `aux` = (codes
    [B, C], their latents [C]) also codes @ w_dec[latents] in float32, else None). `entries` from
    `topk_encode`, or None to sort them here."""
    if entries is None:
        entries = sparse_kernel.sort_entries(indices)
    dtype = _dtype(values, w_dec)
    z_aux, cols = aux if aux is not None else (None, None)
    with torch.autocast(device_type=values.device.type, enabled=False):
        x_hat, e_hat = _SparseDecoder.apply(values, indices, *entries, w_dec, b_dec, dtype, z_aux, cols)
    return x_hat, (e_hat if aux is not None else None)
