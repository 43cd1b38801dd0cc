"""Loading the training stream's shuffle windows in the background: `WindowLoader` reads a window's
blocks of rows (on `READ_THREADS` threads) into one of two alternating host buffers while batches
are gathered from the other, draws the window's shuffle and sorts its batches' positions off the
training thread, and for a device-side shuffle copies the window to the GPU on its own stream.
What a window holds and in which order its rows are served is decided in `rsae.data.stream`.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, NamedTuple

import numpy as np
import torch

from rsae.data.shards import ShardSet

READ_THREADS = 4  # threads that read a shuffle window's blocks in parallel (per loader)


class _Window(NamedTuple):
    """A loaded window's rows and its batches' positions in them (sorted within each piece): `head`
    completes the batch carried over from the previous window, `batches` is `[n, batch_size]`,
    `tail` begins the batch carried into the next window."""

    rows: torch.Tensor
    head: torch.Tensor
    batches: torch.Tensor
    tail: torch.Tensor


class WindowLoader:
    """Loads windows on a background thread into two alternating host buffers, so the next window
    is read from disk while batches are gathered from this one. The thread also draws the window's
    shuffle and sorts its batches' positions (a permutation of 65536 rows costs about 1 ms: on the
    training thread it stalled a small SAE's GPU at every window). File reads and numpy's shift,
    shuffle and sort release the GIL. For a host gather the buffers are float32 (a bf16 cache is
    widened on the way). For a device gather (`device`) a bf16 cache stays bf16 on the host: half
    the bytes cross to the device, which widens each window in one cast. On a GPU the thread also
    copies the window and its positions there, from pinned memory on its own CUDA stream, and
    waits for the copy: it overlaps the training step instead of queueing on its stream (about
    2 ms per 100 MB window on the H200), and the pinned buffers are free again for the next
    window."""

    def __init__(self, shards: ShardSet, max_rows: int, device: torch.device | None = None):
        d, dtype = shards.dims()
        self.shards, self.device = shards, device
        self.narrow = device is not None and dtype == torch.bfloat16
        cuda = device is not None and device.type == "cuda"
        host_dtype = torch.bfloat16 if self.narrow else torch.float32
        # Pinned (page-locked) buffers when windows go on to a GPU: one fast, asynchronous copy per window.
        self.buffers = [torch.empty((max_rows, d), dtype=host_dtype, pin_memory=cuda) for _ in range(2)]
        self.positions = torch.empty(max_rows, dtype=torch.int64, pin_memory=cuda)
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsae-window")
        self.turn = 0

    def submit(self, pieces: np.ndarray, n_rows: int, plan: Callable[[], tuple[np.ndarray, ...]]) -> Future:
        """A future `_Window`: the rows (in the next host buffer, or float32 on `device`) and the
        positions `plan()` returns as (head, batches, tail)."""
        buffer = self.buffers[self.turn]
        self.turn ^= 1

        def load() -> _Window:
            # narrow: the bit patterns as they are in the file
            self.shards.load(pieces, buffer.view(torch.int16).numpy() if self.narrow else buffer.numpy(), READ_THREADS)
            rows, (head, batches, tail) = buffer[:n_rows], plan()
            if self.device is None:
                return _Window(rows, torch.from_numpy(head), torch.from_numpy(batches), torch.from_numpy(tail))
            sizes = (len(head), batches.size, len(tail))
            staged = self.positions[:sum(sizes)]
            np.concatenate([head, batches.ravel(), tail], out=staged.numpy())
            rows, positions = self._to_device(rows, staged)
            head, flat, tail = positions.split(sizes)
            return _Window(rows, head, flat.view(batches.shape), tail)

        return self.pool.submit(load)

    def _to_device(self, rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stream is None:  # not CUDA: plain copies (a narrow window is widened after it); the
            rows = rows.to(self.device)  # positions' buffer is refilled by the next window
            return (rows.float() if self.narrow else rows), positions.to(self.device, copy=True)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            out = rows.to(self.device, non_blocking=True)
            out = out.float() if self.narrow else out
            positions = positions.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()  # on this thread: the buffers may be refilled, and the copies are complete
        return out, positions

    def close(self) -> None:
        if not sys.is_finalizing():  # at interpreter exit the thread is gone already
            self.pool.shutdown(wait=True, cancel_futures=True)
