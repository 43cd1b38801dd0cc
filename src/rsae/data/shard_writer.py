"""The harvest's background shard writer: the forward passes go on while finished shards are
concatenated, checked, serialised, hashed, written and recorded.

    with ShardWriter(depth=3) as writer:
        for ...:
            part = InFlight.start(acts, {"tokens": ..., "seq": ..., "pos": ...}, "sequences 0-7 (...)")
            writer.submit(lambda: write(parts))   # runs on the writer thread, after every earlier job

One thread runs the jobs in the order submitted; `submit` blocks while `depth` jobs wait, so at
most that many finished shards are held in memory. The first exception in a job (a NaN found by
`check_finite`, a full disk) stops the writer: queued jobs are dropped and the main thread gets
that same exception at its next `submit`/`check` or on leaving the block. An exception in the main
thread (Ctrl-C, SIGTERM through the jobs' handler) drops the queued jobs and waits for the one
being written, so nothing is left half-done when the cache lock is released.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from rsae.data import cache_write as W


@dataclass
class InFlight:
    """One batch's rows of one hook point on their way to the host: on CUDA `acts` is a pinned
    buffer filled by a non-blocking copy, `done` the event marking the copy's end, and `finite` a
    pinned flag computed on the GPU; on the CPU `acts` is the tensor itself and the whole check
    runs on the writer thread."""

    acts: torch.Tensor
    extra: dict
    where: str
    finite: torch.Tensor | None = None
    done: torch.cuda.Event | None = None

    @classmethod
    def start(cls, acts: torch.Tensor, extra: dict, where: str) -> "InFlight":
        if acts.device.type != "cuda":
            return cls(acts, extra, where)
        finite = torch.isfinite(acts).all()
        host = torch.empty(acts.shape, dtype=acts.dtype, pin_memory=True)
        host.copy_(acts, non_blocking=True)
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(finite, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(acts.device))
        return cls(host, extra, where, flag, done)

    def rows(self) -> dict[str, torch.Tensor]:
        """Wait for the copy, check for NaN/Inf (raising `check_finite`'s error), return the rows."""
        if self.done is not None:
            self.done.synchronize()
        if self.finite is None or not bool(self.finite):
            W.check_finite(self.acts, self.where)
        return {"acts": self.acts, **self.extra}


class ShardWriter:
    """A single writer thread with a bounded queue of jobs; see the module's docstring."""

    def __init__(self, depth: int = 3) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rsae-shard-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def check(self) -> None:
        """Raise the writer's exception, if a job failed."""
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job` behind the earlier ones; waits while the queue is full."""
        self._put(job)

    def close(self) -> None:
        """Wait for every queued job; raise the writer's exception, if any."""
        self._put(None)
        while self._thread.is_alive():
            self._thread.join(0.1)
        self.check()

    def abort(self) -> None:
        """Drop the queued jobs and wait for the one being run."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wakes a writer waiting for work
        while self._thread.is_alive():
            self._thread.join(0.1)

    def _put(self, job) -> None:
        while True:
            self.check()
            if not self._thread.is_alive():
                self.check()
                raise RuntimeError("the shard writer has stopped")
            try:
                self._queue.put(job, timeout=0.1)
                return
            except queue.Full:
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._queue.get()
            if job is None or self._stop.is_set():
                return
            try:
                job()
            except BaseException as err:  # noqa: BLE001 -- KeyboardInterrupt too: the main thread re-raises it
                self._error = err
                self._stop.set()
                return
