"""Where a profiled step's time goes, from torch.profiler chrome traces (one per rank).

    python -m rsae.bench timeline run/timer_trace_rank0.json.gz [run/timer_trace_rank1.json.gz ...]

Per trace: the GPU window (first to last GPU activity), the time some kernel or copy runs
(busy), the idle rest, and how much of the NCCL time overlaps compute and how much is
exposed; the host's CUDA calls that can wait for the GPU (the profiler's own synchronisations
at its start and end included); the longest idle gaps with the host operation that was
running then (where a host-bound step loses its time). With several ranks' traces, the k-th
NCCL kernel of every rank is taken as one collective: a collective's kernel starts when its
rank gets there and ends when all ranks have, so the spread of start times is time a rank's
NCCL kernel spent waiting for another rank (a slower peer, not the link).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
# Host calls that can wait for the GPU (an async copy waits when its host memory is pageable).
BLOCKING = re.compile(r"^cuda(StreamSynchronize|DeviceSynchronize|EventSynchronize|Memcpy|MemcpyAsync)$")
GEMM = re.compile(r"gemm|xmma|cutlass|cublas|wgmma|nvjet", re.I)


@dataclass(frozen=True)
class Event:
    name: str
    cat: str
    start: float  # µs, absolute when the trace has a base time
    dur: float
    stream: int | None = None

    @property
    def end(self) -> float:
        return self.start + self.dur


def load(path: str | Path) -> list[Event]:
    """The complete ('X') events of a chrome trace written by torch.profiler (plain or gzipped JSON)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    base = float(trace.get("baseTimeNanoseconds", 0)) / 1e3
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or "dur" not in e:
            continue
        args = e.get("args") or {}
        stream = args.get("stream")
        out.append(Event(str(e.get("name", "")), str(e.get("cat", "")), base + float(e["ts"]), float(e["dur"]),
                         int(stream) if stream is not None else None))
    return out


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two sorted, disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def is_nccl(e: Event) -> bool:
    return e.cat == "kernel" and "nccl" in e.name.lower()


def summarize(events: list[Event], steps: int = 1, gaps: int = 5, min_gap_us: float = 50.0) -> dict:
    """Busy/idle/overlap of one rank's trace, per step (`steps` profiled steps), in milliseconds."""
    gpu = [e for e in events if e.cat in GPU_CATS]
    if not gpu:
        return {"error": "no GPU activity in the trace (a CPU-only profile?)"}
    t0, t1 = min(e.start for e in gpu), max(e.end for e in gpu)
    busy = union([(e.start, e.end) for e in gpu])
    nccl = union([(e.start, e.end) for e in gpu if is_nccl(e)])
    compute = union([(e.start, e.end) for e in gpu if not is_nccl(e)])
    gemm = union([(e.start, e.end) for e in gpu if e.cat == "kernel" and GEMM.search(e.name)])
    overlap = intersect(nccl, compute)
    blocking = [e for e in events if e.cat in ("cuda_runtime", "cuda_driver") and BLOCKING.match(e.name)]
    per = lambda us: round(us / 1e3 / max(1, steps), 3)  # noqa: E731 - µs over the window -> ms per step
    res = {
        "steps": steps, "window_ms": per(t1 - t0), "busy_ms": per(length(busy)), "idle_ms": per(t1 - t0 - length(busy)),
        "gemm_ms": per(length(gemm)), "compute_ms": per(length(compute)), "nccl_ms": per(length(nccl)),
        "nccl_overlapped_ms": per(overlap), "nccl_exposed_ms": per(length(nccl) - overlap),
        "host_blocking_ms": per(sum(e.dur for e in blocking)),
        "host_blocking_calls": {n: sum(1 for e in blocking if e.name == n) for n in sorted({e.name for e in blocking})},
    }
    holes = [(e0, s1) for (_, e0), (s1, _) in zip(busy, busy[1:]) if s1 - e0 >= min_gap_us]
    holes.sort(key=lambda h: h[0] - h[1])
    ops = [e for e in events if e.cat in ("cpu_op", "user_annotation", "python_function")]
    res["longest_gaps"] = [{"at_ms": round((s - t0) / 1e3, 3), "gap_us": round(e - s, 1),
                            "host_doing": _host_at(ops, (s + e) / 2)} for s, e in holes[:gaps]]
    return res


def _host_at(ops: list[Event], t: float) -> str:
    """The innermost host operation running at time t (the shortest one that spans it)."""
    spanning = [e for e in ops if e.start <= t <= e.end]
    return min(spanning, key=lambda e: e.dur).name if spanning else "(no profiled host op)"


def collectives(ranks: list[list[Event]], steps: int = 1) -> dict:
    """Match the k-th NCCL kernel of every rank; how long ranks waited for each other."""
    seqs = [sorted((e for e in ev if is_nccl(e)), key=lambda e: e.start) for ev in ranks]
    n = min(len(s) for s in seqs)
    if n == 0:
        return {"error": "no NCCL kernels"}
    wait = own = 0.0
    rows = []
    for k in range(n):
        group = [s[k] for s in seqs]
        last_start = max(e.start for e in group)
        wait += sum(last_start - e.start for e in group) / len(group)  # mean time a rank's kernel sat waiting
        own += sum(e.end - last_start for e in group) / len(group)  # from when all ranks were there
        rows.append({"k": k, "name": group[0].name[:60], "start_spread_us": round(last_start - min(e.start for e in group), 1),
                     "dur_us": [round(e.dur, 1) for e in group]})
    return {"matched": n, "per_rank_counts": [len(s) for s in seqs],
            "mean_wait_for_peer_ms": round(wait / 1e3 / max(1, steps), 3),
            "mean_after_all_arrived_ms": round(own / 1e3 / max(1, steps), 3),
            "largest": sorted(rows, key=lambda r: -max(r["dur_us"]))[:6]}


def report(paths: list[str], steps: int = 1) -> str:
    traces = [load(p) for p in paths]
    lines = [f"Timeline over {steps} profiled step(s); ms per step", "",
             "| trace | window | busy | idle | GEMM | all compute | NCCL | NCCL overlapped | NCCL exposed | host blocking |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    details = []
    for p, ev in zip(paths, traces):
        s = summarize(ev, steps)
        if "error" in s:
            lines.append(f"| {Path(p).name} | {s['error']} | | | | | | | | |")
            continue
        lines.append(f"| {Path(p).name} | {s['window_ms']} | {s['busy_ms']} | {s['idle_ms']} | {s['gemm_ms']} | "
                     f"{s['compute_ms']} | {s['nccl_ms']} | {s['nccl_overlapped_ms']} | {s['nccl_exposed_ms']} | "
                     f"{s['host_blocking_ms']} |")
        details.append(f"{Path(p).name}: blocking calls {s['host_blocking_calls']}; longest GPU-idle gaps: "
                       + "; ".join(f"{g['gap_us']} µs at {g['at_ms']} ms ({g['host_doing']})" for g in s["longest_gaps"]))
    lines += ["", *details]
    if len(traces) > 1:
        c = collectives(traces, steps)
        if "error" not in c:
            lines += ["", f"collectives matched across ranks: {c['matched']} (per rank {c['per_rank_counts']}); "
                      f"a rank's NCCL kernel waited for its peers {c['mean_wait_for_peer_ms']} ms per step and ran "
                      f"{c['mean_after_all_arrived_ms']} ms per step after all had arrived",
                      "largest: " + "; ".join(f"#{r['k']} {r['name']} spread {r['start_spread_us']} µs, durations {r['dur_us']}"
                                              for r in c["largest"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rsae.bench timeline", description=__doc__.splitlines()[0])
    p.add_argument("traces", nargs="+", help="chrome traces (.json or .json.gz), one per rank")
    p.add_argument("--steps", type=int, default=1, help="how many steps the traces cover (for per-step numbers)")
    a = p.parse_args(argv)
    for t in a.traces:
        if not Path(t).is_file():
            p.error(f"no such trace: {t}")
    print(report(a.traces, a.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
