"""The report never shows a run with non-finite results as ok, and tells interrupted runs apart."""

import json

from rsae.report.collect import read_run


def test_status_ok_with_nan_metrics_is_failed(tmp_path):
    # As metrics.json was written before metrics were strict JSON: bare NaN tokens, status ok.
    (tmp_path / "metrics.json").write_text('{"status": "ok", "val/mse": NaN, "val/fvu": NaN, "val/l0": 32.0}')
    run = read_run(tmp_path)
    assert run.status == "failed" and "val/mse" in run.error and run.metrics == {}


def test_eval_with_null_mse_is_failed(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"status": "ok", "mse": None, "fvu": 0.1, "info": {}}))
    assert read_run(tmp_path).status == "failed"


def test_upgrade_stage_with_nan_is_failed(tmp_path):
    (tmp_path / "upgrade.json").write_text('{"teacher": {"mse": 1.0, "fvu": 0.1}, "rsae": {"mse": NaN, "fvu": 0.1}}')
    run = read_run(tmp_path)
    assert run.status == "failed" and "rsae/mse" in run.error


def test_interrupted_run(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "interrupted", "signal": "SIGTERM", "step": 7,
                                                       "resume": "python train.py ckpt_path=x"}))
    run = read_run(tmp_path)
    assert run.status == "interrupted" and "at step 7" in run.error and "ckpt_path=x" in run.error
