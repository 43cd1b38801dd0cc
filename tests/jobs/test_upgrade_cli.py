"""The RSAE upgrade end to end on synthetic data: train a teacher, upgrade it, read upgrade.json."""

import json

import pytest
import torch

from conftest import run_train
from rsae.io.saelens import load_sae

COMMON = ("data=synthetic", "logger=csv", "data.batch_size=256", "data.d_in=16", "data.n_features=64")


@pytest.mark.parametrize("sae", ["relu", "jumprelu", "topk"])
def test_upgrade_reproduces_teacher_then_fine_tunes(tmp_path, sae):
    teacher, up = tmp_path / "teacher", tmp_path / "upgrade"
    k = ("sae.k=4",) if sae == "topk" else ()
    run_train(f"sae={sae}", *k, "trainer.max_steps=150", "trainer.val_check_interval=150", f"hydra.run.dir={teacher}", *COMMON)
    run_train("experiment=rsae_upgrade", f"teacher.path={teacher}/sae", "upgrade.steps=40",
              "upgrade.calibration_tokens=4096", "upgrade.calibration_steps=50", f"hydra.run.dir={up}", *COMMON)
    res = json.loads((up / "upgrade.json").read_text())
    assert set(res) >= {"teacher", "rsae_init", "rsae", "teacher_ft", "settings", "seconds"}
    # Where the time went: every phase that ran is timed.
    assert {"setup", "calibrate", "finetune_rsae", "finetune_teacher_ft", "eval_rsae"} <= set(res["seconds"])
    assert all(v >= 0 for v in res["seconds"].values()) and res["seconds"]["finetune_rsae"] > 0
    for phase in ("teacher", "rsae_init", "rsae", "teacher_ft"):
        assert {"mse", "fvu", "l0", "alive"} <= set(res[phase])
    t, i = res["teacher"], res["rsae_init"]
    # Engineering bar: RSAE-init reproduces the teacher (MSE within 2%, same exact L0 within 2%).
    assert i["mse"] == pytest.approx(t["mse"], rel=0.02)
    assert i["l0"] == pytest.approx(t["l0"], rel=0.02)
    # L0 is held at the teacher's L0 on training rows (same distribution as held-out here).
    target = res["settings"]["l0_target_train"]
    assert target == 4.0 if sae == "topk" else target == pytest.approx(t["l0"], rel=0.15)
    assert res["settings"]["gate"] == {"relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}[sae]
    # The exports load back and the fine-tuned RSAE differs from its init.
    init, tuned = load_sae(up / "rsae_init"), load_sae(up / "rsae")
    assert type(init).__name__ == "RationalSAE"
    assert not torch.equal(init.W_enc, tuned.W_enc)
    assert json.loads((up / "metrics.json").read_text())["status"] == "ok"


def test_upgrade_resumes_finished_phases(tmp_path):
    teacher, up = tmp_path / "teacher", tmp_path / "upgrade"
    run_train("sae=relu", "trainer.max_steps=50", "trainer.val_check_interval=50", f"hydra.run.dir={teacher}", *COMMON)
    args = ("experiment=rsae_upgrade", f"teacher.path={teacher}/sae", "upgrade.steps=10", "upgrade.calibration_tokens=2048",
            "upgrade.calibration_steps=10", "upgrade.control=false", f"hydra.run.dir={up}", *COMMON)
    run_train(*args)
    first = json.loads((up / "upgrade.json").read_text())
    stamp = (up / "rsae" / "sae_weights.safetensors").stat().st_mtime_ns
    run_train(*args)  # everything is done: nothing is recomputed
    assert (up / "rsae" / "sae_weights.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((up / "upgrade.json").read_text())["rsae"] == first["rsae"]


def test_upgrade_rejects_missing_teacher(tmp_path):
    proc = run_train("experiment=rsae_upgrade", f"teacher.path={tmp_path}/nothing", f"hydra.run.dir={tmp_path}/u", *COMMON, check=False)
    assert proc.returncode == 1 and "teacher SAE directory does not exist" in proc.stderr
