"""Timing helpers shared by the benchmarks: device synchronisation, median ms of timed steps, host
synchronisations in one step, a torch.profiler table, the forward's autocast and the step's FLOPs."""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from pathlib import Path

import torch


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, batches, device, warmup: int, steps: int, repeats: int) -> dict:
    """Median ms per step over `repeats` runs of `steps` steps, after `warmup` steps."""
    i = 0
    for _ in range(warmup):
        step(batches[i % len(batches)], i)
        i += 1
    sync(device)
    runs = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step(batches[i % len(batches)], i)
                i += 1
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end) / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(batches[i % len(batches)], i)
                i += 1
            runs.append((time.perf_counter() - t0) * 1e3 / steps)
    return {"ms": statistics.median(runs), "ms_runs": runs, "next_step": i}


def count_syncs(step, batch, index: int, device: torch.device) -> int | None:
    """Host synchronisations inside one step (CUDA only)."""
    if device.type != "cuda" or not hasattr(torch.cuda, "set_sync_debug_mode"):
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            step(batch, index)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sync(device)
    # (the first use of the debug mode also warns that it is a prototype: not a synchronisation)
    return sum("synchroniz" in str(w.message) and "prototype" not in str(w.message) for w in caught)


def profile_steps(step, batches, start: int, device, n: int = 3, rows: int = 18, trace: Path | None = None) -> dict:
    """torch.profiler over `n` steps: the top kernels by GPU time, and the GPU-busy time per step
    (sum of kernel times; against the measured ms/step it shows idle gaps, e.g. a host-bound step).
    With `trace`, also a chrome trace with the operators' input shapes (which call launched a kernel)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities, record_shapes=trace is not None) as prof:
        for i in range(n):
            step(batches[i % len(batches)], start + i)
        sync(device)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    dev_time = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
    gpu_us = sum(dev_time(e) for e in events if e.device_type == DeviceType.CUDA)
    table = None
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            table = events.table(sort_by=key, row_limit=rows, max_name_column_width=70)
            break
        except Exception:  # noqa: BLE001 - the sort key's name changed across torch versions
            continue
    return {"gpu_busy_ms_per_step": gpu_us / 1e3 / n, "table": table}


def flops_per_step(d: int, m: int, batch: int) -> float:
    return 12.0 * d * m * batch
