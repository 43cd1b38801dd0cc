"""Streaming readers over cache shards: a shuffled endless training stream and a fixed val stream.

Training order ("block shuffle"), a pure function of (seed, world size, workers, batch index):

1. The training rows are cut into blocks of `block_rows` consecutive rows of one shard.
2. Epoch e visits every block once in the order `permutation_e` (seeded by (seed, e)); the epochs
   concatenated form one endless block sequence q = 0, 1, 2, ...
3. Block q goes to slot `q mod S`, where S = world_size * num_workers and slot = rank * W + worker:
   in each epoch, ranks and workers read disjoint blocks that together cover every row once.
4. Each slot cuts its blocks of an epoch, in order, into the fewest windows of at most
   `shuffle_buffer` rows (rounded up to whole blocks) with equal block counts (+-1), shuffles the
   rows of a window (seeded by (seed, S, slot, epoch, window)) and cuts its row stream (all
   windows, epoch after epoch) into batches. A background thread reads the next window (plain
   sequential reads of whole blocks on `READ_THREADS` threads; widened to float32 for a host
   gather) and draws its shuffle while batches are gathered from the current one; memory: two
   windows, 2 * shuffle_buffer * d_in * 4 bytes per worker.
5. The DataLoader takes batches from workers in turn, so a rank's batch b is batch b // W of the
   worker that plays role b mod W.

Every rank's stream is endless, so all ranks get the same number of batches (training is by
steps). Resuming at batch P needs no earlier data: epoch and window sizes follow from the
manifest's row counts, so a worker jumps to the window holding its next row and reads only that.

Reading rows from the shards is `rsae.data.shards`, loading windows in the background
`rsae.data.window_loader`; this module decides the order and serves the batches.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rsae.data.shards import ShardSet, one_thread
from rsae.data.window_loader import WindowLoader


def new_batch(rows: int, d: int) -> torch.Tensor:
    """An empty float32 `[rows, d]` tensor; in a loader worker it is allocated in shared memory
    (as torch's own collate does), so handing it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(rows, d, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(rows * d * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage).view(rows, d)


def batches_before(position: int, role: int, n_workers: int) -> int:
    """How many of a rank's first `position` batches came from the worker playing `role`."""
    return max(0, (position - role + n_workers - 1) // n_workers)


class TrainStream(IterableDataset):
    """Endless, shuffled, resumable stream of float32 `[batch_size, d]` training batches (on the
    host, or on `device` when the shuffle window lives there)."""

    def __init__(self, files: Sequence[str | Path], rows: Sequence[int], batch_size: int, seed: int = 0,
                 block_rows: int = 1024, shuffle_buffer: int = 65536, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, device: str | None = None, reuse_buffers: int = 0):
        if sum(rows) == 0:
            raise ValueError("the training split has no rows")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.shards = ShardSet(files, rows)
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), rank, world_size
        self.block_rows, self.shuffle_buffer = int(block_rows), int(shuffle_buffer)
        self.start_batch = int(start_batch)
        # device: None gathers batches on the host (in loader workers or the main process). "cuda"
        # copies each shuffle window to the current GPU once and gathers the batches there: no
        # per-batch host gather, allocation or host-to-device copy (same rows in the same order).
        self.device = device
        # reuse_buffers = R > 0 (training process only): full batches are gathered into a ring of R
        # preallocated tensors instead of fresh ones. A fresh 4096 x 2304 float32 batch costs its
        # page faults on every allocation: 18.8 ms against 3.0 ms for the same gather into a
        # reused buffer (one thread, 2-core VM). The consumer must be done with a batch R - 1
        # batches later (a training loop holds two; pinning copies it at once); clone to keep one.
        self.reuse_buffers = int(reuse_buffers)
        self._ring: list[torch.Tensor] = []
        self._ring_next = 0
        starts = [(s, lo, min(lo + self.block_rows, n)) for s, n in enumerate(self.shards.rows)
                  for lo in range(0, n, self.block_rows)]
        self.blocks = np.array(starts, dtype=np.int64).reshape(-1, 3)  # (shard, start, stop)
        self.block_sizes = self.blocks[:, 2] - self.blocks[:, 1]
        self._perms: dict[int, np.ndarray] = {}

    # ---- the order -------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        return self._perms[epoch]

    def _window_blocks(self, n_slots: int) -> int:
        per_window = math.ceil(self.shuffle_buffer / self.block_rows)
        return max(1, min(per_window, len(self.blocks) // n_slots))

    def epoch_blocks(self, slot: int, n_slots: int, epoch: int) -> np.ndarray:
        """Block ids `slot` reads in `epoch`, in order: the epoch's permutation dealt round-robin,
        continuing the deal across epochs so that every slot gets blocks even if blocks < slots."""
        first = (slot - epoch * len(self.blocks)) % n_slots
        return self._epoch_order(epoch)[first::n_slots]

    def _window_permutation(self, slot: int, n_slots: int, epoch: int, index: int, n_rows: int) -> np.ndarray:
        return np.random.default_rng([self.seed, n_slots, slot, epoch, index]).permutation(n_rows)

    # ---- iteration ---------------------------------------------------------------------------
    def worker_role(self) -> tuple[int, int, int]:
        """(slot, number of slots, batches this worker skips) for the calling worker process."""
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        role = (worker + self.start_batch) % n_workers  # the loader polls worker 0 first
        slot = self.rank * n_workers + role
        return slot, self.world_size * n_workers, batches_before(self.start_batch, role, n_workers)

    def __iter__(self) -> Iterator[torch.Tensor]:
        slot, n_slots, skip = self.worker_role()
        return self.slot_batches(slot, n_slots, skip)

    def windows(self, slot: int, n_slots: int, skip_rows: int = 0) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """(epoch, index, block ids, rows to skip) of the slot's windows, from row `skip_rows` of its
        stream on; whole epochs and windows before it are skipped using block sizes alone."""
        offset, epoch = skip_rows, 0
        while True:
            size = int(self.block_sizes[self.epoch_blocks(slot, n_slots, epoch)].sum())
            if offset < size:
                break
            offset, epoch = offset - size, epoch + 1
        per_window = self._window_blocks(n_slots)
        while True:
            blocks = self.epoch_blocks(slot, n_slots, epoch)
            # The fewest windows that hold the epoch's blocks, of equal block counts (+-1): a short
            # last window would shuffle few rows, and be used up before the next one is read.
            for index, window in enumerate(np.array_split(blocks, max(1, math.ceil(len(blocks) / per_window)))):
                size = int(self.block_sizes[window].sum())
                if offset >= size:
                    offset -= size
                    continue
                yield epoch, index, window, offset
                offset = 0
            epoch += 1

    def slot_batches(self, slot: int, n_slots: int, skip: int = 0) -> Iterator[torch.Tensor]:
        """Batches of one slot from its batch number `skip` on."""
        windows = self.windows(slot, n_slots, skip * self.batch_size)
        device = self._gather_device()
        loader = WindowLoader(self.shards, self._window_blocks(n_slots) * self.block_rows, device)
        carried = 0  # rows of the batch a submitted window leaves unfinished: its rows and the earlier ones, mod batch_size

        def submit(window: tuple[int, int, np.ndarray, int]) -> Future:
            nonlocal carried
            epoch, index, blocks, offset = window
            n_rows = int(self.block_sizes[blocks].sum())
            plan = partial(self._window_plan, slot, n_slots, epoch, index, n_rows, offset, carried)
            carried = (carried + n_rows - offset) % self.batch_size
            return loader.submit(self.blocks[blocks], n_rows, plan)

        try:
            pending = submit(next(windows))
            carry: torch.Tensor | None = None
            while True:
                window = pending.result()
                if window.rows.is_cuda:  # made on the loader's stream, read on this one: not to be reused before
                    stream = torch.cuda.current_stream(window.rows.device)
                    window.rows.record_stream(stream)
                    window.batches.record_stream(stream)  # (head, batches and tail share one allocation)
                pending = submit(next(windows))  # read the next window while this one is served
                if carry is not None:  # complete the batch begun in the previous window
                    carry = torch.cat([carry, self._take(window.rows, window.head)])
                    if len(carry) < self.batch_size:
                        continue
                    yield carry
                    carry = None
                for i in range(len(window.batches)):
                    yield self._take(window.rows, window.batches[i])
                if len(window.tail):
                    carry = self._take(window.rows, window.tail)
        finally:
            loader.close()

    def _window_plan(self, slot: int, n_slots: int, epoch: int, index: int, n_rows: int, offset: int,
                     carried: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A window's rows in the stream's order, from row `offset` on, cut into (head, batches,
        tail) after `carried` rows of an unfinished batch, each piece's positions sorted (sorted
        positions read memory in order; the order of rows inside a batch does not matter to
        training)."""
        order = self._window_permutation(slot, n_slots, epoch, index, n_rows)[offset:]
        need = min(self.batch_size - carried, len(order)) if carried else 0
        rest = order[need:]
        full = len(rest) - len(rest) % self.batch_size
        batches = np.sort(rest[:full].reshape(-1, self.batch_size), axis=1)
        return np.sort(order[:need]), batches, np.sort(rest[full:])

    def _gather_device(self) -> torch.device | None:
        if self.device is None:
            return None
        if get_worker_info() is not None:
            raise RuntimeError("a device-side shuffle runs in the training process: use num_workers=0")
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            if not torch.cuda.is_available():
                raise RuntimeError("shuffle_device=cuda but CUDA is not available")
            device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU under DDP
        return device

    def _take(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The rows at `positions`: with a device-side shuffle a plain index_select where the window
        is (a fresh tensor from that device's allocator); on the host into a fresh or ring buffer."""
        if self.device is not None:
            return torch.index_select(rows, 0, positions)
        with one_thread():
            return torch.index_select(rows, 0, positions, out=self._out(len(positions), rows.shape[1]))

    def _out(self, n: int, d: int) -> torch.Tensor:
        """Where a gather of n rows goes: the next ring buffer (full batches in the training
        process, with reuse_buffers), else a fresh tensor."""
        if self.reuse_buffers <= 0 or n != self.batch_size or get_worker_info() is not None:
            return new_batch(n, d)
        if not self._ring:
            self._ring = [torch.empty(n, d, dtype=torch.float32) for _ in range(self.reuse_buffers)]
        out = self._ring[self._ring_next]
        self._ring_next = (self._ring_next + 1) % self.reuse_buffers
        return out


class ValStream(IterableDataset):
    """The held-out rows in file order as float32 `[batch_size, d]` batches (the last may be short).

    Under DDP each rank takes every world_size-th batch; ranks short of a batch repeat one from the
    start (as DistributedSampler pads), so all ranks run the same number of validation steps.
    """

    def __init__(self, files: Sequence[str | Path], rows: Sequence[int], batch_size: int, rank: int = 0,
                 world_size: int = 1):
        self.shards = ShardSet(files, rows)
        self.batch_size, self.rank, self.world_size = int(batch_size), rank, world_size
        self.offsets = np.concatenate([[0], np.cumsum(self.shards.rows)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.n_batches = math.ceil(self.total / self.batch_size)

    def batches_per_rank(self) -> int:
        # No __len__: Lightning warns about sized IterableDatasets, and it learns the end anyway.
        return math.ceil(self.n_batches / self.world_size) if self.n_batches else 0

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the concatenated split, as float32."""
        pieces = []
        for shard in range(len(self.shards.rows)):
            lo, hi = max(start, self.offsets[shard]), min(stop, self.offsets[shard + 1])
            if lo < hi:
                base = int(self.offsets[shard])
                pieces.append((shard, int(lo) - base, int(hi) - base))
        d, _ = self.shards.dims()
        return self.shards.read_into(torch.empty(stop - start, d, dtype=torch.float32), pieces)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for i in range(worker, self.batches_per_rank(), n_workers):
            g = (self.rank + i * self.world_size) % self.n_batches
            yield self.rows(g * self.batch_size, min((g + 1) * self.batch_size, self.total))


class StreamLoader(DataLoader):
    """DataLoader that restarts its TrainStream at the current position each time it is iterated
    (a new Lightning epoch or a resumed run), read from `position_fn` set after construction."""

    position_fn = None

    def __iter__(self):
        if self.position_fn is not None:
            self.dataset.start_batch = int(self.position_fn())
        return super().__iter__()
