"""Row-wise top-k selection as one Triton kernel: the indices of the k largest entries of each row.

`torch.topk` on a [4096, 24576] bf16 matrix with k = 32 runs a radix select in three kernels:
0.75 ms on an H200, more than three of the encoder's GEMMs. Here one program handles one row:

1. Split the row into CHUNKS >= 2k contiguous chunks and take each chunk's maximum. The k-th
   largest of those maxima is a lower bound L on the row's k-th largest entry (k distinct entries
   are >= L).
2. Copy the entries >= L (the candidates: about 2k for unstructured rows) into a per-row scratch
   buffer, as 64-bit keys: the value's order-preserving 32-bit pattern above the column.
3. Sort the candidates (at most CAND of them) in the program and keep the first k.

A row with more than CAND candidates (many ties, or its largest entries crowded into few chunks)
finds its k-th largest key by bisection over the keys instead, one pass over the row per step,
and takes the ties at that key in column order. Either way the result is exact: the same set of
values as `torch.topk` (NaN counts as the largest value, as there); among tied values the lower
columns are kept. Entries are read as float32 whatever the input dtype (an exact widening).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from rsae.triton_jit import jit_functions

try:  # Triton is optional: without it `supported` is False
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import problem means "no kernel"
    triton = tl = None

# int32 bounds as Triton compile-time constants (kernels may only read constexpr globals)
INT32_MIN = tl.constexpr(-(2**31)) if tl is not None else -(2**31)
INT32_MAX = tl.constexpr(2**31 - 1) if tl is not None else 2**31 - 1


def _key(x, ok):
    """int32 keys ordered as the float32 values x (NaN largest); INT32_MIN where not `ok`."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ INT32_MAX, bits)
    key = tl.where(x != x, INT32_MAX, key)
    return tl.where(ok, key, INT32_MIN)


def _tile(base, c_ids, j, chunk, n_cols):
    """The [CHUNKS, SUB] tile of keys at offsets j of every chunk, and its column numbers."""
    col = c_ids[:, None] * chunk + j[None, :]
    ok = (j[None, :] < chunk) & (col < n_cols)
    return _key(tl.load(base + col, mask=ok, other=0.0).to(tl.float32), ok), col


def _positions(sel, start):
    """Distinct positions start, start + 1, ... for the True entries of a 2-d mask (row-major)."""
    s = sel.to(tl.int32)
    per_chunk = tl.sum(s, axis=1)
    before = tl.cumsum(per_chunk, axis=0) - per_chunk
    return start + before[:, None] + tl.cumsum(s, axis=1) - 1, tl.sum(per_chunk, axis=0)


def _row_topk_kernel(h_ptr, idx_ptr, scratch_ptr, n_cols, chunk,
                     K: tl.constexpr, CHUNKS: tl.constexpr, SUB: tl.constexpr, CAND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = h_ptr + row * n_cols
    out = idx_ptr + row * K
    scratch = scratch_ptr + row * CAND
    c_ids = tl.arange(0, CHUNKS)
    j_ids = tl.arange(0, SUB)

    # 1. chunk maxima; their K-th largest bounds the row's K-th largest from below
    best = tl.full([CHUNKS], INT32_MIN, tl.int32)
    for j0 in range(0, chunk, SUB):
        key, _ = _tile(base, c_ids, j0 + j_ids, chunk, n_cols)
        best = tl.maximum(best, tl.max(key, axis=1))
    ranked = tl.sort(best, descending=True)
    low = tl.sum(tl.where(c_ids == K - 1, ranked, 0), axis=0)
    top = tl.max(best, axis=0)

    # 2. candidates (key >= low) into the scratch buffer, while they fit
    count = 0
    for j0 in range(0, chunk, SUB):
        key, col = _tile(base, c_ids, j0 + j_ids, chunk, n_cols)
        cand = key >= low
        pos, n = _positions(cand, count)
        packed = (key.to(tl.int64) << 32) | (n_cols - 1 - col).to(tl.int64)  # ties: lower column first
        tl.store(scratch + pos, packed, mask=cand & (pos < CAND))
        count += n
    tl.debug_barrier()  # the scratch stores are visible to every thread of the program

    s_ids = tl.arange(0, CAND)
    if count <= CAND:  # 3. sort the candidates, keep the first K
        packed = tl.load(scratch + s_ids, mask=s_ids < count, other=0)
        packed = tl.where(s_ids < count, packed, tl.full([CAND], INT32_MIN, tl.int64) << 32)
        ranked_c = tl.sort(packed, descending=True)
        col = (n_cols - 1) - (ranked_c & INT32_MAX).to(tl.int32)
        tl.store(out + s_ids, col.to(tl.int64), mask=s_ids < K)
    else:  # bisection: the largest key t with at least K entries >= t
        lo = low.to(tl.int64)
        hi = top.to(tl.int64) + 1  # no entry is >= hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            n_ge = 0
            for j0 in range(0, chunk, SUB):
                key, _ = _tile(base, c_ids, j0 + j_ids, chunk, n_cols)
                n_ge += tl.sum(tl.sum((key.to(tl.int64) >= mid).to(tl.int32), axis=1), axis=0)
            if n_ge >= K:
                lo = mid
            else:
                hi = mid
        t = lo.to(tl.int32)
        n_gt = 0
        for j0 in range(0, chunk, SUB):
            key, _ = _tile(base, c_ids, j0 + j_ids, chunk, n_cols)
            n_gt += tl.sum(tl.sum((key > t).to(tl.int32), axis=1), axis=0)
        # every entry > t, then the first K - n_gt entries == t in column order
        taken_gt = 0
        taken_eq = 0
        for j0 in range(0, chunk, SUB):
            key, col = _tile(base, c_ids, j0 + j_ids, chunk, n_cols)
            gt = key > t
            pos_gt, n1 = _positions(gt, taken_gt)
            tl.store(out + pos_gt, col.to(tl.int64), mask=gt)
            eq = key == t
            pos_eq, n2 = _positions(eq, n_gt + taken_eq)
            tl.store(out + pos_eq, col.to(tl.int64), mask=eq & (pos_eq < K))
            taken_gt += n1
            taken_eq += n2


@functools.lru_cache(maxsize=None)
def _kernel():
    return jit_functions(globals(), ("_key", "_tile", "_positions", "_row_topk_kernel"))["_row_topk_kernel"]


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def shape_for(m: int, k: int) -> tuple[int, int, int] | None:
    """(CHUNKS, chunk length, CAND) for rows of m entries, or None when the kernel does not apply
    (rows too short for chunks of at least 4 entries, or k above 1024)."""
    if not 1 <= k <= 1024:
        return None
    chunks = _pow2(2 * k)
    if m < 4 * chunks:
        return None
    # CAND: 512 at least. Pre-activations of a trained SAE crowd their largest entries into few
    # chunks, and rows past 128 candidates took the bisection: H200, [4096, 24576] bf16, k = 32,
    # 1.66 ms per call late in a training run and 3.45 ms on rows whose top entries sit in the first
    # 2000 columns, against 0.50 ms with room for 512 (0.44 to 0.49 ms on unstructured rows).
    return chunks, -(-m // chunks), max(512, _pow2(4 * k))


def supported(h: Tensor, k: int) -> bool:
    return (triton is not None and h.ndim == 2 and h.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and shape_for(h.shape[1], k) is not None)


def row_topk_indices(h: Tensor, k: int, capacity: int | None = None) -> Tensor:
    """Indices [rows, k] (int64, in no particular order) of the k largest entries of each row of
    a contiguous 2-d h (see the module docstring). `capacity` overrides the candidate buffer
    (a power of two >= k; tests use a small one to reach the bisection)."""
    if not supported(h, k):
        raise ValueError(f"row_topk_indices: needs Triton, a 2-d float tensor and rows of at least "
                         f"4 * next_pow2(2k) entries, got {tuple(h.shape)} {h.dtype}, k={k}")
    chunks, chunk, cand = shape_for(h.shape[1], k)
    if capacity is not None:
        if capacity < k or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two >= k ({k}), got {capacity}")
        cand = capacity
    n = h.shape[0]
    h = h.contiguous()
    idx = torch.empty((n, k), dtype=torch.int64, device=h.device)
    scratch = torch.empty((n, cand), dtype=torch.int64, device=h.device)
    if n:
        sub = max(16, 4096 // chunks)
        _kernel()[(n,)](h, idx, scratch, h.shape[1], chunk, K=k, CHUNKS=chunks, SUB=sub, CAND=cand,
                        num_warps=4)
    return idx
