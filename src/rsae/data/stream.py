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
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rsae.data.cache import ShardReader

READ_THREADS = 4  # threads that read a shuffle window's blocks in parallel (per loader)


@contextlib.contextmanager
def one_thread():
    """Run memory-bound copies on one thread: they gain little from more, and with OpenMP a
    parallel copy stalls at its barrier whenever the machine is busy (measured here: 0.7 GB/s on
    two threads of a loaded 2-core machine against tens of GB/s on one). Loader workers already
    run with one thread; this also covers `num_workers=0`."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


class _Shards:
    """Lazily opened memory maps of a split's shards (opened inside each worker process)."""

    def __init__(self, files: Sequence[str | Path], rows: Sequence[int]):
        self.files = [Path(f) for f in files]
        self.rows = [int(r) for r in rows]
        self._readers: dict[int, ShardReader] = {}
        self._opening = threading.Lock()
        self._pool: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool) for reads, made on first use here

    def reader(self, shard: int) -> ShardReader:
        reader = self._readers.get(shard)
        if reader is None:
            with self._opening:  # (reading threads may ask for the same shard at once)
                reader = self._readers.get(shard) or ShardReader(self.files[shard], self.rows[shard])
                self._readers[shard] = reader
        return reader

    def read_into(self, out: torch.Tensor, pieces: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Copy the rows of `(shard, start, stop)` pieces, in order, into `out` (converting dtype)."""
        at = 0
        with one_thread():
            for shard, start, stop in pieces:
                out[at:at + stop - start].copy_(self.reader(shard).view(start, stop))
                at += stop - start
        return out

    def load(self, pieces: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """Read the rows of `(shard, start, stop)` pieces, in order, into `out` with plain
        sequential reads: as stored when `out` has the storage's item size (the bit patterns), else
        a bf16 shard widened to float32 on the way. With `threads` > 1 the pieces are cut into that
        many runs, read in parallel: the reads release the GIL, and one thread copying out of the
        page cache (about 5 GB/s on the H200 host) fell behind a small SAE's step on a GPU."""
        pieces = np.asarray(pieces, dtype=np.int64).reshape(-1, 3)
        ends = np.cumsum(pieces[:, 2] - pieces[:, 1])
        starts = ends - (pieces[:, 2] - pieces[:, 1])
        runs = [r for r in np.array_split(np.arange(len(pieces)), max(1, min(threads, len(pieces)))) if len(r)]
        jobs = [(pieces[r], out[int(starts[r[0]]):int(ends[r[-1]])]) for r in runs]
        if len(jobs) <= 1:
            for job in jobs:
                self._load_run(*job)
            return
        if self._pool is None or self._pool[0] < len(jobs):
            if self._pool is not None:
                self._pool[1].shutdown(wait=False)
            self._pool = (len(jobs), ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="rsae-read"))
        for future in [self._pool[1].submit(self._load_run, *job) for job in jobs]:
            future.result()

    def _load_run(self, pieces: np.ndarray, out: np.ndarray) -> None:
        at, staging = 0, None
        for shard, start, stop in pieces.tolist():
            reader, n = self.reader(shard), stop - start
            if out.itemsize == reader.array.itemsize:
                reader.read_into(start, stop, out[at:at + n])
            else:  # bf16 -> fp32 is a 16-bit shift of the bit pattern; numpy does it in one pass
                if staging is None or len(staging) < n:
                    staging = np.empty((n, reader.d), dtype=np.uint16)
                reader.read_into(start, stop, staging[:n])
                np.left_shift(staging[:n], 16, out=out[at:at + n].view(np.uint32), dtype=np.uint32)
            at += n

    def dims(self) -> tuple[int, torch.dtype]:
        first = self.reader(next(i for i, n in enumerate(self.rows) if n > 0))
        return first.d, first.torch_dtype

    def __getstate__(self):  # files are reopened in each worker, not pickled
        return {**self.__dict__, "_readers": {}, "_opening": None, "_pool": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _opening=threading.Lock())


class _Window(NamedTuple):
    """A loaded window's rows and its batches' positions in them (sorted within each piece): `head`
    completes the batch carried over from the previous window, `batches` is `[n, batch_size]`,
    `tail` begins the batch carried into the next window."""

    rows: torch.Tensor
    head: torch.Tensor
    batches: torch.Tensor
    tail: torch.Tensor


class _WindowLoader:
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

    def __init__(self, shards: _Shards, max_rows: int, device: torch.device | None = None):
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
        self.shards = _Shards(files, rows)
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
        loader = _WindowLoader(self.shards, self._window_blocks(n_slots) * self.block_rows, device)
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
        self.shards = _Shards(files, rows)
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
