"""End-to-end runs of train.py on synthetic data (tiny CPU runs, as a user would type them)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_train

COMMON = ("data=synthetic", "logger=csv", "data.batch_size=256", "trainer.val_check_interval=100")


@pytest.mark.parametrize("sae", ["relu", "jumprelu", "topk", "batchtopk", "matryoshka", "gated"])
def test_train_writes_metrics_export_and_checkpoint(tmp_path, sae):
    run_train(f"sae={sae}", "trainer.max_steps=300", f"hydra.run.dir={tmp_path}", *COMMON)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "ok"
    for key in ("val/mse", "val/fvu", "val/l0", "val/alive", "val/dense", "val/l2_ratio", "val/mmcs", "val/recovered"):
        assert key in metrics, key
    assert 0 <= metrics["val/fvu"] < 0.6, metrics  # it learned something in 300 steps
    assert metrics["val/l0"] > 0
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 64 and cfg["d_sae"] == 256
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (64, 256) and weights["W_dec"].shape == (256, 64)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()


@pytest.mark.parametrize("cuda_graph", ["false", "true"])  # true: manual optimisation (uncaptured on the CPU)
def test_resume_matches_uninterrupted_run(tmp_path, cuda_graph):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    keep_all = ("callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.every_n_train_steps=100")
    graph = f"module.cuda_graph={cuda_graph}"
    run_train("sae=topk", "trainer.max_steps=200", *keep_all, graph, f"hydra.run.dir={full}", *COMMON)
    mid = full / "checkpoints" / "step00000100.ckpt"
    run_train("sae=topk", "trainer.max_steps=200", graph, f"ckpt_path={mid}", f"hydra.run.dir={resumed}", *COMMON)
    a = load_file(str(full / "sae" / "sae_weights.safetensors"))
    b = load_file(str(resumed / "sae" / "sae_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # The resumed run really trained on from step 100 (the exported decoder folds the scale in).
    at_100 = torch.load(mid, map_location="cpu", weights_only=True)["state_dict"]
    scale = float(at_100["act_scale"])
    assert not torch.allclose(at_100["sae.W_dec"] / scale, b["W_dec"])
    assert json.loads((resumed / "metrics.json").read_text())["train/steps"] == 200
    if cuda_graph == "true":  # resuming with the other setting is refused with one line
        proc = run_train("sae=topk", "trainer.max_steps=200", f"ckpt_path={mid}", f"hydra.run.dir={tmp_path / 'other'}",
                         *COMMON, check=False)
        assert proc.returncode == 1 and "resume it with the same setting" in proc.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("sae=topk", "sae.k=0"), "sae.k must be an integer in [1, d_sae=256], got 0"),
        (("sae=topk", "sae.k=100000"), "sae.k must be an integer in [1, d_sae=256], got 100000"),
        (("sae=relu", "sae.l1_coefficient=-1"), "sae.l1_coefficient must be a finite number >= 0, got -1"),
        (("sae=relu", "sae.expansion_factor=null", "sae.d_sae=0"), "sae.d_sae must be an integer >= 1 or null, got 0"),
        (("sae=relu", "sae.d_in=32"), "does not match the data's d_in=64"),
        (("sae=topk", "ckpt_path=/nonexistent.ckpt"), "ckpt_path does not exist"),
    ],
)
def test_bad_configs_fail_with_one_line(tmp_path, overrides, message):
    proc = run_train(*overrides, "trainer.max_steps=5", f"hydra.run.dir={tmp_path}", *COMMON, check=False)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_unknown_architecture_is_rejected(tmp_path):
    proc = run_train("sae=no_such_architecture", f"hydra.run.dir={tmp_path}", *COMMON, check=False)
    assert proc.returncode != 0 and "no_such_architecture" in proc.stderr
