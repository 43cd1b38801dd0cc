"""Row reads from the activation cache's safetensors shards: `ShardReader` gives one shard's rows as
zero-copy views through a memory map or as plain reads into a caller's buffer, and `ShardSet`
opens a split's shards lazily (in each loader worker) and copies `(shard, start, stop)` pieces of
rows, in order, into one buffer: as stored, or a bf16 shard widened to float32 on the way,
optionally on several reading threads. `one_thread` keeps memory-bound copies on one thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rsae.data.cache import CacheCorruptError

_NUMPY_VIEW = {"BF16": (np.uint16, torch.bfloat16), "F32": (np.float32, torch.float32)}


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


class ShardReader:
    """Row access to one safetensors shard: zero-copy views through a memory map, or plain reads
    into a caller's buffer (`read_into`, which releases the GIL while the kernel copies)."""

    def __init__(self, path: str | Path, rows: int | None = None):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
            info = header["acts"]
            np_dtype, self.torch_dtype = _NUMPY_VIEW[info["dtype"]]
            n, d = info["shape"]
            start = 8 + header_len + info["data_offsets"][0]
            # copy-on-write mapping: reads come from the page cache, torch gets a writable array
            # (no warning), and nothing can ever be written back to the file
            self.array = np.memmap(self.path, dtype=np_dtype, mode="c", offset=start, shape=(n, d))
            self._data_offset, self._row_bytes = start, d * np.dtype(np_dtype).itemsize
            self._fd = os.open(self.path, os.O_RDONLY)
        except (OSError, ValueError, KeyError, struct.error) as err:
            raise CacheCorruptError(f"cannot read shard {self.path}: {err}; delete the cache directory to rebuild it") from None
        if rows is not None and n != rows:
            raise CacheCorruptError(f"shard {self.path} has {n} rows, manifest says {rows}")
        self.rows, self.d = n, d

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Read rows [start, stop) into the C-contiguous array `out` (same itemsize as storage)."""
        view = memoryview(out).cast("B")
        offset, done, total = self._data_offset + start * self._row_bytes, 0, (stop - start) * self._row_bytes
        while done < total:
            got = os.preadv(self._fd, [view[done:total]], offset + done)
            if got <= 0:
                raise CacheCorruptError(f"shard {self.path} ended early (truncated?); delete the cache directory to rebuild it")
            done += got

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def view(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) in the storage dtype, without copying (valid while the reader lives)."""
        return torch.from_numpy(self.array[start:stop]).view(self.torch_dtype)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a new tensor in the storage dtype."""
        return self.view(start, stop).clone()



class ShardSet:
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
