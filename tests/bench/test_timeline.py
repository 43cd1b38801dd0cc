"""`python -m rsae.bench timeline`: busy/idle/overlap arithmetic against hand-computed values on
hand-made chrome traces, the cross-rank matching of NCCL kernels, and the trace StepTimer writes."""

from __future__ import annotations

import gzip
import json

import pytest

from rsae.bench import timeline


def kernel(name, ts, dur, stream=7):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": stream, "args": {"stream": stream}}


def host(name, ts, dur, cat="cpu_op"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}


def write(path, events, base_ns=0):
    data = json.dumps({"baseTimeNanoseconds": base_ns, "traceEvents": [{"ph": "M", "name": "process_name", "pid": 0}, *events]})
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(data)
    else:
        path.write_text(data)
    return path


RANK0 = [
    kernel("sm90_xmma_gemm_bf16", 0, 100),  # compute [0, 100]
    kernel("ncclDevKernel_AllReduce_Sum_f32", 80, 40, stream=20),  # NCCL [80, 120]: 20 overlapped, 20 exposed
    kernel("elementwise_relu", 200, 100),  # compute [200, 300]; GPU idle [120, 200]
    host("aten::div", 150, 20),  # inner op spanning the gap's middle (160)
    host("aten::add", 140, 100),
    host("cudaStreamSynchronize", 10, 30, cat="cuda_runtime"),
    host("cudaLaunchKernel", 50, 5, cat="cuda_runtime"),
]


def test_summary_matches_hand_computation(tmp_path):
    s = timeline.summarize(timeline.load(write(tmp_path / "r0.json", RANK0)), steps=2, min_gap_us=50)
    assert s["window_ms"] == pytest.approx(0.300 / 2)
    assert s["busy_ms"] == pytest.approx(0.220 / 2)
    assert s["idle_ms"] == pytest.approx(0.080 / 2)
    assert s["gemm_ms"] == pytest.approx(0.100 / 2)
    assert s["compute_ms"] == pytest.approx(0.200 / 2)
    assert s["nccl_ms"] == pytest.approx(0.040 / 2)
    assert s["nccl_overlapped_ms"] == pytest.approx(0.020 / 2)
    assert s["nccl_exposed_ms"] == pytest.approx(0.020 / 2)
    assert s["host_blocking_ms"] == pytest.approx(0.030 / 2)
    assert s["host_blocking_calls"] == {"cudaStreamSynchronize": 1}
    assert s["longest_gaps"] == [{"at_ms": 0.12, "gap_us": 80.0, "host_doing": "aten::div"}]


def test_ranks_nccl_kernels_are_matched_and_waiting_is_split_out(tmp_path):
    r0 = write(tmp_path / "r0.json.gz", RANK0, base_ns=1_000_000)  # rank 0's clock base is 1000 µs later
    # rank 1 reaches the all-reduce 20 µs after rank 0 (ts 1100 + base 0 = 1100 absolute vs 1080 for rank 0)
    r1 = write(tmp_path / "r1.json.gz", [kernel("gemm", 1000, 100), kernel("ncclDevKernel_AllReduce_Sum_f32", 1100, 20, 20)])
    c = timeline.collectives([timeline.load(r0), timeline.load(r1)])
    assert c["matched"] == 1 and c["per_rank_counts"] == [1, 1]
    assert c["mean_wait_for_peer_ms"] == pytest.approx((0.020 + 0.0) / 2)  # rank 0 waited 20 µs, rank 1 none
    assert c["mean_after_all_arrived_ms"] == pytest.approx(0.020)  # both end at 1120, all there at 1100
    text = timeline.report([str(r0), str(r1)])
    assert "waited for its peers 0.01 ms per step" in text and "| r0.json.gz |" in text


def test_cpu_only_trace_says_so(tmp_path):
    s = timeline.summarize(timeline.load(write(tmp_path / "cpu.json", [host("aten::mm", 0, 10)])))
    assert "no GPU activity" in s["error"]


def test_missing_trace_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit):
        timeline.main([str(tmp_path / "nope.json")])


def test_step_timer_writes_a_trace_the_timeline_reads(tmp_path):
    import lightning as L

    from rsae.bench._step_timer import StepTimer
    from rsae.data.synthetic import SyntheticDataModule
    from rsae.lit.module import SAEModule
    from rsae.sae import ReLUSAE

    timer = StepTimer(str(tmp_path / "timer.json"), skip=8, profile_steps=2)
    trainer = L.Trainer(max_steps=10, limit_val_batches=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(SAEModule(ReLUSAE(8, 32)), datamodule=SyntheticDataModule(d_in=8, n_features=32, batch_size=16))
    trace = tmp_path / "timer_trace_rank0.json.gz"
    events = timeline.load(trace)
    assert any(e.cat == "cpu_op" and e.name.startswith("aten::") for e in events)
    assert "no GPU activity" in (tmp_path / "timer_profile.txt").read_text()  # the CPU run's timeline says so
