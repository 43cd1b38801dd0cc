"""Fast paths for training steps: the same functions as the plain skeleton, computed with less work.

* `linear_encoder`: h = (x - b_dec) @ W_enc + b_enc as one fused GEMM (bias in the epilogue) whose
  backward skips the input gradient: b_dec's gradient through the encoder is -W_enc @ sum_rows(dh),
  a matrix-vector product instead of the [batch, d_in] x [d_in, d_sae] GEMM autograd would run to
  form dL/d(x - b_dec). W_enc's gradient comes out in W_enc's memory layout and dtype
  (`weight_grad`), so autograd stores it without a copy. Under autocast h comes out in the
  autocast dtype (bf16), as the GEMM does.
* `sparse_decode`: x_hat = sum_k z_k W_dec[idx_k] + b_dec for codes with few non-zeros (TopK,
  BatchTopK), through `embedding_bag`: only the selected decoder rows are read, and the backward
  only touches those rows, instead of a dense [batch, d_sae] x [d_sae, d_in] GEMM.
* `topk_select`: the k largest entries per row, by one `torch.topk`, in two stages (top-k of each
  chunk of a row, then top-k of the candidates; exact, as every global top-k entry is among its
  chunk's top k), or by the one-pass Triton kernel of `rsae.sae.topk_kernel`, whichever is fastest
  on the device (timed once per shape).
* `mark_fired`: the dead-latent counter update without a boolean-mask assignment (which makes the
  host wait for the GPU); `AsyncCount`: a device integer read by the host one step later;
  `DeadLatentBound`: the host's wait-free upper bounds on the counts (captured steps);
  `aux_capacity`: the size AuxK's set of dead latents is rounded up to.

`enabled()` / `disabled()`: switch the fast paths off to get the plain computation (the tests
compare the two; `python -m rsae.bench train` times both).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch import Tensor

_off = 0


def enabled() -> bool:
    return _off == 0


@contextlib.contextmanager
def disabled():
    """Within this block the architectures take their plain (reference) code paths."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for this device type, or None."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


# --- encoder ----------------------------------------------------------------------------------------


class _LinearEncoder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_enc, b_enc, b_dec, dtype):
        xc = x.to(dtype) if b_dec is None else (x - b_dec).to(dtype)
        w = w_enc.to(dtype)
        h = torch.addmm(b_enc.to(dtype), xc, w)
        ctx.save_for_backward(xc, w, w_enc)
        ctx.has_b_dec = b_dec is not None
        return h

    @staticmethod
    def backward(ctx, dh):
        xc, w, w_enc = ctx.saved_tensors
        need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
        dh = dh.to(w.dtype)
        dx = dw = dbe = dbd = None
        if need_w:
            dw = weight_grad(xc.t(), dh, w_enc)
        if need_be or need_bd:
            col = dh.sum(0, dtype=torch.float32)  # sum over rows, accumulated in float32
            dbe = col if need_be else None
            if need_bd:  # d/d b_dec of (x - b_dec) @ W = -(sum_rows dh) @ W^T, a matrix-vector product
                dbd = -(w_enc.float() @ col)
        if need_x:
            dx = dh @ w.t()
        return dx, dw, dbe, dbd, None


def weight_grad(a: Tensor, b: Tensor, weight: Tensor) -> Tensor:
    """a @ b, the gradient of `weight`, laid out in memory as `weight` is and in its dtype.

    A gradient whose strides differ from its parameter's is copied into the parameter's layout
    when autograd stores it: a transposed copy of the whole matrix (1.1 ms per step for the
    encoder of a 2304 x 65536 SAE, whose W_enc is stored transposed). On CUDA a bf16/fp16 product
    is written out in float32 by the GEMM itself rather than cast afterwards."""
    transposed = weight.dim() == 2 and weight.stride(0) == 1 and weight.shape[0] > 1 and weight.shape[1] > 1
    if transposed:  # weight is [m, n] with column-major strides: form (b^T a^T)^T, row-major [n, m]
        a, b = b.t(), a.t()
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and weight.dtype == torch.float32:
        out = torch.mm(a, b, out_dtype=torch.float32)
    else:
        out = a @ b
    return out.t() if transposed else out


def linear_encoder(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None) -> Tensor:
    """(x - b_dec) @ w_enc + b_enc; the GEMM runs in the autocast dtype when autocast is on (else
    in the weights' dtype), and the backward computes the input gradient only if x needs one."""
    dtype = _autocast_dtype(x.device.type) or torch.promote_types(x.dtype, w_enc.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _LinearEncoder.apply(x, w_enc, b_enc, b_dec, dtype)


# --- decoder ----------------------------------------------------------------------------------------


def sparse_decode(values: Tensor, indices: Tensor, w_dec: Tensor, b_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
    """b_dec + sum_k values[.., k] * w_dec[indices[.., k]] for each row.

    values, indices: [B, k] (every row has k entries), or 1-d with `offsets` [B] marking where each
    row's entries start (rows of varying length, entries grouped by row). The sum runs in w_dec's
    dtype (float32 master weights: no rounding of the decoder rows)."""
    out = F.embedding_bag(indices, w_dec, offsets=offsets, mode="sum",
                          per_sample_weights=values.to(w_dec.dtype))
    return out + b_dec


# --- selection --------------------------------------------------------------------------------------

SELECTION = "auto"  # auto | torch | chunked | triton
_CHUNKS = 64
_choice: dict[tuple, str] = {}


def _chunked_topk(h: Tensor, k: int, chunks: int) -> tuple[Tensor, Tensor]:
    n, m = h.shape
    size = m // chunks
    v1, i1 = torch.topk(h.view(n, chunks, size), k, dim=-1, sorted=False)
    i1 = i1 + torch.arange(0, m, size, device=h.device).view(1, chunks, 1)
    v2, j = torch.topk(v1.reshape(n, chunks * k), k, dim=-1, sorted=False)
    return v2, i1.reshape(n, chunks * k).gather(-1, j)


def _chunks_for(m: int, k: int) -> int | None:
    chunks = _CHUNKS
    while chunks > 1 and (m % chunks or m // chunks < 4 * k):
        chunks //= 2
    return chunks if chunks > 1 else None


def _time(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _methods(h: Tensor, k: int) -> dict[str, object]:
    """The exact top-k methods that apply to h: name -> function returning the indices."""
    from rsae.sae import topk_kernel

    out = {"torch": lambda: torch.topk(h, k, dim=-1, sorted=False)[1]}
    chunks = _chunks_for(h.shape[1], k)
    if chunks is not None:
        out["chunked"] = lambda: _chunked_topk(h, k, chunks)[1]
    if h.is_cuda and topk_kernel.supported(h, k):
        out["triton"] = lambda: topk_kernel.row_topk_indices(h, k)
    return out


def _topk_indices(h: Tensor, k: int) -> Tensor:
    methods = _methods(h, k)
    method = SELECTION
    if method == "auto":
        method = "torch"
        if h.is_cuda and len(methods) > 1:
            key = (*h.shape, k, h.dtype, h.device)
            if key not in _choice and not torch.cuda.is_current_stream_capturing():
                times = {name: _time(fn) for name, fn in methods.items()}  # once per shape, outside any capture
                best = min(times, key=times.get)
                _choice[key] = best if times[best] < 0.9 * times["torch"] else "torch"
            method = _choice.get(key, "torch")
    return methods.get(method, methods["torch"])()


@torch.library.custom_op("rsae::topk_indices", mutates_args=())
def _topk_indices_op(h: Tensor, k: int) -> Tensor:
    """`_topk_indices` as one opaque operator, so that a compiled step runs the chosen method."""
    return _topk_indices(h, k)


@_topk_indices_op.register_fake
def _topk_indices_fake(h: Tensor, k: int) -> Tensor:
    return h.new_empty((h.shape[0], k), dtype=torch.int64)


def topk_select(h: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest entries of each row of a 2-d h, in no particular order
    (no gradient; gather the values from h to differentiate). The method is `SELECTION`: `auto`
    times the exact methods that apply once per (shape, k, dtype) on CUDA (`torch.topk`, a
    two-stage chunked `torch.topk`, the Triton kernel of `rsae.sae.topk_kernel`) and keeps the
    fastest unless `torch.topk` is within 10% of it; elsewhere it is `torch.topk`. A compiled
    step makes the same choice at run time (the selection is one opaque operator there)."""
    with torch.no_grad():
        compiled = h.is_cuda and torch.compiler.is_compiling()
        indices = _topk_indices_op(h, k) if compiled else _topk_indices(h, k)
        return h.gather(-1, indices), indices


# --- dead-latent tracking ---------------------------------------------------------------------------


@torch.no_grad()
def mark_fired(tokens_since_fired: Tensor, fired: Tensor, n_tokens: int) -> None:
    """tokens_since_fired += n_tokens, then 0 where `fired` (no host synchronisation)."""
    tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)


def aux_capacities(d_sae: int) -> list[int]:
    """The sizes a step's set of dead latents is rounded up to: 0 (none dead), then powers of two
    from 128 while under d_sae / 2. More dead latents than the largest: AuxK runs over all d_sae
    columns. Few sizes, so a captured step (keyed by the size) is recaptured rarely."""
    caps, c = [0], 128
    while c < d_sae // 2:
        caps.append(c)
        c *= 2
    return caps


def aux_capacity(n_dead: int, d_sae: int) -> int:
    """The smallest of `aux_capacities` that holds n_dead latents, else d_sae."""
    return next((c for c in aux_capacities(d_sae) if n_dead <= c), d_sae)


class AsyncCount:
    """An integer computed on the GPU and copied to pinned host memory without waiting; `read` a
    step later returns it (waiting only for work queued long before) or None when there is
    nothing valid to read (never recorded, recorded for another version of the source tensor, or
    not on CUDA). Copies of the owner (deepcopy, pickling) start empty."""

    def __init__(self) -> None:
        self._host: Tensor | None = None
        self._event = None
        self._version: tuple | None = None

    def record(self, value: Tensor, version: tuple) -> None:
        if not value.is_cuda:
            self._event = None
            return
        if self._host is None:
            self._host = torch.empty((), dtype=torch.int64, pin_memory=True)
        self._host.copy_(value.reshape(()), non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        self._version = version

    def read(self, version: tuple) -> int | None:
        if self._event is None or self._version != version:
            return None
        self._event.synchronize()
        return int(self._host)

    def __deepcopy__(self, memo) -> "AsyncCount":
        return AsyncCount()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class DeadLatentBound:
    """An upper bound on how many latents are dead (count >= dead_after), known on the host
    without waiting.

    `record` (after each step) counts, on the GPU, the latents that would be dead after j more
    steps of the same size without firing (counts >= dead_after - j tokens per step; j = 0..7,
    then doubling up to dead_after), and copies the counts to pinned memory behind the GPU's work,
    with the number of tokens the host had counted by then. `capacity` takes the newest copy that
    has landed (an event query, never a wait): a count grows by at most the tokens counted since,
    so the count for the first j that covers them bounds the dead latents now (the host may run
    many steps ahead of the GPU: the bound loosens, it does not fail). A captured step uses it to
    leave AuxK out exactly when no latent can be dead, and to run it over a few columns when few
    can, without a host synchronisation. Copies of the owner start empty."""

    def __init__(self, slots: int = 4) -> None:
        self.tokens = 0  # tokens the host has counted
        # (dead counts j steps ahead, those j, tokens per step, dead_after, tokens counted at the record)
        self.known: tuple[list[int], list[int], int, int, int] | None = None
        self.pending: list[tuple] = []  # copies on their way: (pinned, event, js, tokens per step, dead_after, tokens)
        self.free: dict[int, list[Tensor]] = {}
        self.slots = slots
        self._thresholds: tuple[tuple, list[int], Tensor] | None = None

    @staticmethod
    def steps_ahead(dead_after: int, n_tokens: int) -> list[int]:
        js, j = list(range(8)), 8
        while (j // 2) * n_tokens < dead_after:  # up to the first j at which every count has reached it
            js.append(j)
            j *= 2
        return js

    def record(self, counts: Tensor, n_tokens: int, dead_after: int) -> None:
        self.tokens += n_tokens
        key = (dead_after, n_tokens, counts.device)
        if self._thresholds is None or self._thresholds[0] != key:
            js = self.steps_ahead(dead_after, n_tokens)
            thresholds = dead_after - n_tokens * torch.tensor(js, dtype=counts.dtype)
            self._thresholds = (key, js, thresholds.to(counts.device)[:, None])
        _, js, thresholds = self._thresholds
        ahead = (counts >= thresholds).sum(1)
        if not counts.is_cuda:
            self.known = (ahead.tolist(), js, n_tokens, dead_after, self.tokens)
            return
        self._collect()
        if len(self.pending) >= self.slots:  # the GPU is far behind: skip; the bound only gets looser
            return
        free = self.free.setdefault(len(js), [])
        host = free.pop() if free else torch.empty(len(js), dtype=ahead.dtype, pin_memory=True)
        host.copy_(ahead, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((host, event, js, n_tokens, dead_after, self.tokens))

    def _collect(self) -> None:
        while self.pending and self.pending[0][1].query():
            host, _, js, n_tokens, dead_after, tokens = self.pending.pop(0)
            self.known = (host.tolist(), js, n_tokens, dead_after, tokens)
            self.free.setdefault(len(js), []).append(host)

    def dead_at_most(self, dead_after: int) -> int | None:
        """The bound now, or None when there is none (no copy landed yet, one made for another
        dead_after, or so many tokens counted since that every latent can be dead)."""
        self._collect()
        if self.known is None or self.known[3] != dead_after:
            return None
        ahead, js, n_tokens, _, tokens = self.known
        grown = self.tokens - tokens
        return next((n for n, j in zip(ahead, js) if j * n_tokens >= grown), None)  # (past them: every latent)

    def capacity(self, dead_after: int, d_sae: int) -> int:
        """`aux_capacity` of the bound: a size that holds every latent that can be dead now; d_sae
        when there is no bound."""
        n = self.dead_at_most(dead_after)
        return d_sae if n is None else aux_capacity(n, d_sae)

    def __deepcopy__(self, memo) -> "DeadLatentBound":
        return DeadLatentBound(self.slots)

    def __getstate__(self) -> dict:
        return {"slots": self.slots}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state.get("slots", 4))


def tensor_version(t: Tensor) -> tuple:
    """Identifies a tensor's current contents: (storage, in-place modification counter)."""
    return (t.data_ptr(), t._version)
