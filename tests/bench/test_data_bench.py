"""`python -m rsae.bench data --skip-harvest`: streaming rates of an existing cache, including the
device-side shuffle path (here on the CPU). No timing assertions."""

from __future__ import annotations

import json

import torch

from rsae.bench import data
from rsae.bench._synthetic import write_synthetic_cache


def test_stream_bench_runs_the_device_shuffle_path(tmp_path):
    cache = tmp_path / "cache"
    write_synthetic_cache(cache, 16, 8192, 1024, torch.device("cpu"))
    out = tmp_path / "data.json"
    assert data.main(["--skip-harvest", "--cache-dir", str(cache), "--num-workers", "0", "--stream-copies", "1",
                      "--batch-size", "256", "--shuffle-device", "cpu", "--json", str(out)]) == 0
    stream = json.loads(out.read_text())["stream"]
    for key in ("warm, num_workers=0", "warm, num_workers=0, shuffle_device=cpu"):
        assert stream[key]["stream_GBps"] > 0 and stream[key]["raw_read_GBps"] > 0
    assert stream["window_loads_warm"]["widened_GBps"] > 0 and stream["window_loads_warm"]["as_stored_GBps"] > 0


def test_multi_hook_part_times_one_pass_against_single_harvests(tmp_path):
    from rsae.data.tiny import make_tiny_lm, sample_text

    (tmp_path / "text.md").write_text(sample_text(100, seed=1))
    lm = make_tiny_lm(tmp_path / "lm", "llama", vocab_size=300)
    out = tmp_path / "data.json"
    assert data.main(["--parts", "multi_hook", "--model", str(lm), "--text", str(tmp_path / "text.md"),
                      "--multi-layers", "0", "2", "--n-tokens", "1024", "--context-size", "32", "--repeats", "1",
                      "--json", str(out)]) == 0
    multi = json.loads(out.read_text())["multi_hook"]
    assert set(multi["seconds"]) == {"single_0", "single_2", "one_pass"}
    assert multi["one_pass_vs_deepest_single"] > 0 and multi["one_pass_vs_all_singles"] > 0
