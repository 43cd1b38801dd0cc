"""The RSAE upgrade of a Gated teacher on synthetic data: its JumpReLU form (magnitude path, thresholds
b_mag - exp(r_mag) b_gate) is reproduced by the jumprelu mask; the control fine-tunes the Gated SAE."""

import json
from pathlib import Path

import pytest

from conftest import run_train

COMMON = ("data=synthetic", "logger=csv", "data.batch_size=256", "data.d_in=16", "data.n_features=64")


def test_upgrade_of_a_gated_teacher_reproduces_it(tmp_path):
    teacher, up = tmp_path / "teacher", tmp_path / "upgrade"
    run_train("sae=gated", "trainer.max_steps=150", "trainer.val_check_interval=150", f"hydra.run.dir={teacher}", *COMMON)
    # Faster thresholds for the RSAE's mask; the Gated control has no log_threshold and runs without them.
    run_train("sae=rational", f"teacher.path={teacher}/sae", "upgrade.steps=20", "+module.lr_scales={log_threshold:20}",
              "upgrade.calibration_tokens=4096", "upgrade.calibration_steps=50", f"hydra.run.dir={up}", *COMMON)
    res = json.loads((up / "upgrade.json").read_text())
    t, i = res["teacher"], res["rsae_init"]
    assert i["mse"] == pytest.approx(t["mse"], rel=0.02)
    assert i["l0"] == pytest.approx(t["l0"], rel=0.02)
    assert res["settings"]["gate"] == "jumprelu" and res["settings"]["teacher_mechanism"] == "gated" == res["settings"]["teacher_architecture"]
    assert json.loads((up / "teacher_ft" / "cfg.json").read_text())["architecture"] == "gated"  # the control
    assert json.loads((up / "metrics.json").read_text())["status"] == "ok"


def test_lr_scales_reach_the_control_only_where_it_has_the_parameters():
    from rsae.jobs.upgrade import phase_lr_scales
    from rsae.sae import GatedSAE, JumpReLUSAE

    scales = {"log_threshold": 20.0, "W_enc": 2.0}
    assert phase_lr_scales(scales, GatedSAE(8, 16), "rsae") == scales  # (the module refuses a missing prefix there)
    assert phase_lr_scales(scales, GatedSAE(8, 16), "teacher_ft") == {"W_enc": 2.0}
    assert phase_lr_scales(scales, JumpReLUSAE(8, 16), "teacher_ft") == scales


def test_each_fine_tune_gets_its_learning_rate_scales():
    from hydra import compose, initialize_config_dir

    import rsae.config  # noqa: F401  (registers the config resolvers)
    from rsae.jobs.upgrade import phase_module
    from rsae.sae import GatedSAE, RationalSAE

    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=synthetic", "+module.lr_scales={log_threshold:20}"])
    rsae = RationalSAE(8, 16, gate="jumprelu", degrees=[5, 4], init_table="relu_5_4", c_in_init=4.0)
    module = phase_module(cfg, rsae, "rsae", {"rational_gate.": 30.0})
    assert module.lr_scales == {"log_threshold": 20.0, "rational_gate.": 30.0}
    assert module.lr == cfg.upgrade.lr
    assert phase_module(cfg, GatedSAE(8, 16), "teacher_ft").lr_scales == {}
