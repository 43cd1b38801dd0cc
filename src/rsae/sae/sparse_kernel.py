"""Triton kernels for codes with k non-zeros per row (TopK): the decoder and both weight gradients
touch only the selected latents, instead of dense [batch, d_sae] GEMMs.

The codes are `values` [n, k] at latent `indices` [n, k]; `W` is a [d_sae, d] matrix (the decoder,
or the encoder in its [d_sae, d_in] memory layout).

* `gather_rows`: out[r] = sum_i values[r, i] * W[indices[r, i]], as float32 (the decoder).
* `gather_dots`: out[r, i] = g[r] . W[indices[r, i]] (the gradient of the codes).
* `scatter_rows`: out[j] = sum over entries (r, i) with indices[r, i] == j of values[r, i] * a[r],
  as float32 [d_sae, d] (a weight gradient: a is the decoder's output gradient or the encoder's
  input). It reads the entries sorted by latent (`sort_entries`, once per step for both
  gradients): each program takes BLOCK_E consecutive sorted entries, sums each latent's run of
  them with one small matrix product (a [runs, entries] matrix holding the values, times the
  gathered rows of a), and writes the run sums into `out`: stored where the run holds all of its
  latent's entries, added atomically for the first and last run of the block, which may continue
  in the neighbouring blocks. Every program does the same work however unevenly the latents fire.

Inputs of a bf16/fp16 `a` take the values in that dtype (as a bf16 GEMM over dense codes does) and
accumulate in float32. Run where Triton runs: CUDA tensors, or any tensor under Triton's
interpreter (TRITON_INTERPRET=1; tests).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from rsae.triton_jit import interpreting, jit_functions

try:  # Triton is optional: without it `supported` is False
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import problem means "no kernel"
    triton = tl = None

# Tile shapes and warps per kernel (`python -m rsae.bench sparse` times alternatives).
TILES = {
    "gather_rows": {"BLOCK_ROWS": 16, "BLOCK_D": 128, "num_warps": 4},
    "gather_dots": {"BLOCK_E": 16, "BLOCK_D": 128, "num_warps": 4},
    "scatter_rows": {"BLOCK_E": 32, "BLOCK_D": 128, "num_warps": 4},
}


def _gather_rows_kernel(v_ptr, idx_ptr, w_ptr, out_ptr, n_rows, d, K: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cols < d)[None, :]
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    for i in range(K):
        lat = tl.load(idx_ptr + rows * K + i, mask=row_ok, other=0)
        v = tl.load(v_ptr + rows * K + i, mask=row_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + lat[:, None] * d + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += v[:, None] * w
    tl.store(out_ptr + rows[:, None] * d + cols[None, :], acc, mask=ok)


def _gather_dots_kernel(g_ptr, idx_ptr, w_ptr, out_ptr, n_entries, d, K: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < n_entries
    row = e // K
    lat = tl.load(idx_ptr + e, mask=e_ok, other=0)
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = e_ok[:, None] & (cols < d)[None, :]
        g = tl.load(g_ptr + row[:, None] * d + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + lat[:, None] * d + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(g * w, axis=1)
    tl.store(out_ptr + e, acc, mask=e_ok)


def _scatter_rows_kernel(lat_ptr, order_ptr, v_ptr, a_ptr, out_ptr, n_entries, d, K: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK_E
    e = start + tl.arange(0, BLOCK_E)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    e_ok = e < n_entries
    lat = tl.load(lat_ptr + e, mask=e_ok, other=-1)
    prev = tl.load(lat_ptr + e - 1, mask=e_ok & (e > start), other=-2)
    run = tl.cumsum((lat != prev).to(tl.int32), axis=0) - 1  # each entry's run of equal latents, 0..
    src = tl.load(order_ptr + e, mask=e_ok, other=0)  # the entry's place in values [n, K]
    a = tl.load(a_ptr + (src // K)[:, None] * d + cols[None, :], mask=e_ok[:, None] & (cols < d)[None, :], other=0.0)
    v = tl.load(v_ptr + src, mask=e_ok, other=0.0).to(a.dtype)
    runs = tl.arange(0, BLOCK_E)
    member = run[None, :] == runs[:, None]  # [run, entry]
    if IEEE:  # float32 inputs (and the interpreter, whose bf16 dot is wrong): exact float32 products
        sums = tl.dot(tl.where(member, v[None, :], 0.0).to(tl.float32), a.to(tl.float32), input_precision="ieee")
    else:
        sums = tl.dot(tl.where(member, v[None, :], 0.0).to(a.dtype), a)
    run_lat = tl.max(tl.where(member, lat[None, :], -1), axis=1).to(tl.int64)  # -1: no such run
    # Runs strictly inside the block hold every entry of their latent: no other program writes that
    # row, so a plain store will do. The first and last runs may continue in the neighbouring blocks.
    last = tl.max(tl.where(e_ok, run, 0), axis=0)
    edge = (runs == 0) | (runs == last)
    ptrs = out_ptr + run_lat[:, None] * d + cols[None, :]
    ok = (run_lat >= 0)[:, None] & (cols < d)[None, :]
    tl.store(ptrs, sums, mask=ok & ~edge[:, None])
    tl.atomic_add(ptrs, sums, mask=ok & edge[:, None])


@functools.lru_cache(maxsize=None)
def _kernels() -> dict:
    return jit_functions(globals(), ("_gather_rows_kernel", "_gather_dots_kernel", "_scatter_rows_kernel"))


def supported(t: Tensor) -> bool:
    """Whether the kernels run on t's device: CUDA with Triton, or Triton's interpreter."""
    return triton is not None and (t.is_cuda or interpreting())


def _check(indices: Tensor, w: Tensor, values: Tensor | None = None) -> None:
    shapes_ok = indices.ndim == 2 and w.ndim == 2 and (values is None or values.shape == indices.shape)
    if not shapes_ok:
        got = [tuple(t.shape) for t in (values, indices, w) if t is not None]
        raise ValueError(f"sparse kernels: need values and indices [n, k] and a 2-d W, got {got}")


def gather_rows(values: Tensor, indices: Tensor, w: Tensor) -> Tensor:
    """[n, d] float32: row r is sum_i values[r, i] * w[indices[r, i]]."""
    _check(indices, w, values)
    n, k = values.shape
    d = w.shape[1]
    out = torch.empty((n, d), dtype=torch.float32, device=w.device)
    if n and d:
        t = TILES["gather_rows"]
        grid = (triton.cdiv(n, t["BLOCK_ROWS"]), triton.cdiv(d, t["BLOCK_D"]))
        _kernels()["_gather_rows_kernel"][grid](values.contiguous(), indices.contiguous(), w.contiguous(), out, n, d,
                                                K=k, **t)
    return out


def gather_dots(g: Tensor, indices: Tensor, w: Tensor) -> Tensor:
    """[n, k] float32: entry (r, i) is g[r] . w[indices[r, i]]."""
    _check(indices, w)
    n, k = indices.shape
    d = w.shape[1]
    if g.shape != (n, d):
        raise ValueError(f"gather_dots: g must be [{n}, {d}], got {tuple(g.shape)}")
    out = torch.empty((n, k), dtype=torch.float32, device=w.device)
    if n * k and d:
        t = TILES["gather_dots"]
        grid = (triton.cdiv(n * k, t["BLOCK_E"]),)
        _kernels()["_gather_dots_kernel"][grid](g.contiguous(), indices.contiguous(), w.contiguous(), out, n * k, d,
                                                K=k, **t)
    return out


def sort_entries(indices: Tensor) -> tuple[Tensor, Tensor]:
    """(the latents of all entries in ascending order, each one's position in indices.flatten())."""
    lat, order = torch.sort(indices.flatten().to(torch.int32), stable=True)  # 32-bit keys: half the radix passes
    return lat, order


def scatter_rows(values: Tensor, sorted_entries: tuple[Tensor, Tensor], a: Tensor, n_latents: int) -> Tensor:
    """[n_latents, d] float32: row j is the sum of values[r, i] * a[r] over the entries at latent j
    (`sorted_entries` from `sort_entries(indices)`)."""
    lat, order = sorted_entries
    n, k = values.shape
    d = a.shape[1]
    if a.shape[0] != n or lat.numel() != n * k:
        raise ValueError(f"scatter_rows: a must have {n} rows and the entries {n * k}, got {tuple(a.shape)}, "
                         f"{lat.numel()}")
    out = torch.zeros((n_latents, d), dtype=torch.float32, device=a.device)
    if n * k and d:
        t = TILES["scatter_rows"]
        grid = (triton.cdiv(n * k, t["BLOCK_E"]), triton.cdiv(d, t["BLOCK_D"]))
        _kernels()["_scatter_rows_kernel"][grid](lat, order, values.contiguous(), a.contiguous(), out, n * k, d, K=k,
                                                 IEEE=a.dtype == torch.float32 or not a.is_cuda, **t)
    return out


# --- the operators --------------------------------------------------------------------------------------
# torch.library custom ops, so that torch.compile keeps a training step in one graph around each kernel
# (an opaque operator with a known output shape) instead of breaking it there.


@torch.library.custom_op("rsae::gather_rows", mutates_args=())
def gather_rows_op(values: Tensor, indices: Tensor, w: Tensor) -> Tensor:
    return gather_rows(values, indices, w)


@gather_rows_op.register_fake
def _(values, indices, w):
    return w.new_empty((values.shape[0], w.shape[1]), dtype=torch.float32)


@torch.library.custom_op("rsae::gather_dots", mutates_args=())
def gather_dots_op(g: Tensor, indices: Tensor, w: Tensor) -> Tensor:
    return gather_dots(g, indices, w)


@gather_dots_op.register_fake
def _(g, indices, w):
    return w.new_empty(tuple(indices.shape), dtype=torch.float32)


@torch.library.custom_op("rsae::scatter_rows", mutates_args=())
def scatter_rows_op(values: Tensor, lat: Tensor, order: Tensor, a: Tensor, n_latents: int) -> Tensor:
    return scatter_rows(values, (lat, order), a, n_latents)


@scatter_rows_op.register_fake
def _(values, lat, order, a, n_latents):
    return a.new_empty((n_latents, a.shape[1]), dtype=torch.float32)
