"""The callback that times train.py's training steps, for the end-to-end and DDP benchmarks:
`+callbacks.step_timer._target_=rsae.bench._step_timer.StepTimer`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import lightning as L


class StepTimer(L.Callback):
    """Wall time of the training steps after the first `skip`, synchronised at both ends, written as
    JSON to `out` (rank 0) when training ends. The clock stops at the end of the last training
    batch and pauses through validations, so neither counts. With `profile_steps`, torch.profiler
    also records that many steps just before the timed window (host and GPU time by operation,
    GPU-busy ms per step) into `<out stem>_profile.txt`. With `sync_steps`, the host synchronisations of that many steps
    just before the timed window are counted (torch.cuda.set_sync_debug_mode) with the source
    lines that caused them: a sync every step stops the host from running ahead of the GPU."""

    def __init__(self, out: str, skip: int = 50, profile_steps: int = 0, sync_steps: int = 0) -> None:
        self.out, self.skip, self.profile_steps = Path(out), int(skip), int(profile_steps)
        self.sync_steps = int(sync_steps)
        self._sync_start = max(1, self.skip - self.sync_steps - 1)
        self._sync_catch = None
        self.syncs: dict | None = None
        self.paused = 0.0  # seconds of validation inside the timed window (not training: excluded)
        self._val_t0: float | None = None
        self._end: tuple[float, int] | None = None  # (time, step) at the end of the last training batch
        self.t0: float | None = None
        self.step0 = 0
        self.batch_size = None
        self._prof = None
        self._prof_start = max(1, self.skip - self.profile_steps - 2)

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.sync_steps and self.syncs is None and self._sync_catch is None and step == self._sync_start \
                and pl_module.device.type == "cuda":
            import warnings

            self._sync(pl_module)
            self._sync_catch = warnings.catch_warnings(record=True)
            self._sync_records = self._sync_catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(1)
        if self.profile_steps and self._prof is None and step == self._prof_start:
            from torch.profiler import ProfilerActivity, profile

            self._sync(pl_module)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pl_module.device.type == "cuda" else [])
            self._prof = profile(activities=acts)
            self._prof.start()
        if self.t0 is None and step >= self.skip:
            self._sync(pl_module)
            self.t0, self.step0 = time.perf_counter(), step
            self.batch_size = int(batch.shape[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.t0 is not None and 0 < trainer.max_steps <= trainer.global_step:  # the last step: stop the clock
            self._sync(pl_module)  # before the final validation and teardown
            self._end = (time.perf_counter(), trainer.global_step)
        if self._sync_catch is not None and trainer.global_step == self._sync_start + self.sync_steps:
            torch.cuda.set_sync_debug_mode(0)
            self._sync_catch.__exit__(None, None, None)
            self._sync_catch = None
            found = [r for r in self._sync_records if "synchroniz" in str(r.message)]
            sites: dict[str, int] = {}
            for r in found:
                key = f"{r.filename}:{r.lineno}"
                sites[key] = sites.get(key, 0) + 1
            self.syncs = {"steps": self.sync_steps, "per_step": len(found) / self.sync_steps, "sites": sites}
        if self._prof is not None and trainer.global_step == self._prof_start + self.profile_steps:
            self._sync(pl_module)
            self._prof.stop()
            self._write_trace(self._prof, trainer.global_rank)
            if trainer.global_rank == 0:
                self._write_profile(self._prof)
            self._prof = False  # done

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.t0 is not None and self._end is None:  # a validation inside the timed window
            self._sync(pl_module)
            self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_t0 is not None:
            self._sync(pl_module)
            self.paused += time.perf_counter() - self._val_t0
            self._val_t0 = None

    def trace_path(self, rank: int) -> Path:
        return self.out.with_name(f"{self.out.stem}_trace_rank{rank}.json.gz")

    def _write_trace(self, prof, rank: int) -> None:
        """Every rank's chrome trace (gzipped), for `python -m rsae.bench timeline`."""
        import gzip
        import shutil

        path = self.trace_path(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        plain = path.with_suffix("")  # .json
        prof.export_chrome_trace(str(plain))
        with open(plain, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        plain.unlink()

    def _write_profile(self, prof) -> None:
        from torch.autograd import DeviceType

        events = prof.key_averages()
        dev = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
        gpu_ms = sum(dev(e) for e in events if e.device_type == DeviceType.CUDA) / 1e3 / self.profile_steps
        parts = [f"GPU-busy {gpu_ms:.2f} ms per step over {self.profile_steps} profiled steps"]
        if self.trace_path(0).is_file():
            from rsae.bench.timeline import report

            parts.append(report([str(self.trace_path(0))], self.profile_steps))
        for key in ("self_cpu_time_total", "self_device_time_total", "self_cuda_time_total"):
            try:
                parts.append(f"sorted by {key}:\n" + events.table(sort_by=key, row_limit=18, max_name_column_width=70))
            except Exception:  # noqa: BLE001 - sort keys differ across torch versions
                continue
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.with_name(self.out.stem + "_profile.txt").write_text("\n\n".join(parts) + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        if self.t0 is None or trainer.global_rank != 0:  # rank 0 reports (ranks would race on one file)
            return
        end, step = self._end or (time.perf_counter(), trainer.global_step)
        seconds = end - self.t0 - self.paused
        steps = step - self.step0
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({
            "steps": steps, "seconds": seconds, "ms": 1e3 * seconds / max(1, steps), "batch": self.batch_size,
            "tokens_per_s": steps * (self.batch_size or 0) / max(seconds, 1e-9),
            "peak_gib": torch.cuda.max_memory_allocated(pl_module.device) / 2**30 if pl_module.device.type == "cuda" else None,
            "host_syncs": self.syncs, "validation_s_excluded": self.paused,
        }))
