"""`python -m rsae.bench ddp --cpu`: 2 gloo processes against 1 process at twice the batch, on the
same tokens and optimizer steps. The two compute the same gradient mean, so their validation
metrics must agree closely, and the two ranks must read different rows. No timing assertions."""

from __future__ import annotations

import json

from rsae.bench import ddp


def test_ddp_bench_matches_the_single_process_run(tmp_path, capsys):
    out = tmp_path / "ddp.json"
    rc = ddp.main(["--cpu", "--d", "16", "--m", "64", "--batch", "32", "--steps", "12", "--gpus", "2",
                   "--rows", "2048", "--workers", "0", "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0, (res["single"].get("error"), res["ddp"].get("error"))
    assert "scaling (same rows per step) 2 GPUs / 1 GPU" in capsys.readouterr().out
    assert res["ranks_read_different_rows"] is True
    # Every rank reads Lightning's per-batch SIGTERM flag late (no host sync per step).
    assert [p["sigterm_check"] for p in res["ddp"]["probes"]] == ["LaggedSigtermCheck"] * 2
    single, multi = res["single"]["metrics"], res["ddp"]["metrics"]
    for key in ("val/mse", "val/fvu", "val/l0"):
        assert abs(multi[key] - single[key]) <= 0.02 * abs(single[key]), (key, single[key], multi[key])
    # Both timed some steps after the skipped warm-up.
    assert res["single"]["timer"]["steps"] > 0 and res["ddp"]["timer"]["steps"] > 0


def test_weak_scaling_gives_the_single_run_the_per_rank_batch(tmp_path, capsys):
    out = tmp_path / "ddp.json"
    rc = ddp.main(["--cpu", "--weak", "--d", "16", "--m", "64", "--batch", "32", "--steps", "8", "--gpus", "2",
                   "--rows", "2048", "--workers", "0", "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0
    assert res["single"]["timer"]["batch"] == 32 and res["ddp"]["timer"]["batch"] == 32
    assert "weak scaling (same rows per GPU) 2 GPUs / 1 GPU" in capsys.readouterr().out
