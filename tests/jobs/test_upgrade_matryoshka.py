"""The RSAE upgrade of a Matryoshka BatchTopK teacher on synthetic data: its mask keeps the threshold."""

import json

import pytest

from conftest import run_train

COMMON = ("data=synthetic", "logger=csv", "data.batch_size=256", "data.d_in=16", "data.n_features=64")


def test_upgrade_of_a_matryoshka_teacher_reproduces_it(tmp_path):
    teacher, up = tmp_path / "teacher", tmp_path / "upgrade"
    run_train("sae=matryoshka", "sae.k=4", "trainer.max_steps=150", "trainer.val_check_interval=150",
              f"hydra.run.dir={teacher}", *COMMON)
    run_train("sae=rational", f"teacher.path={teacher}/sae", "upgrade.steps=20", "upgrade.control=false",
              "upgrade.calibration_tokens=4096", "upgrade.calibration_steps=50", f"hydra.run.dir={up}", *COMMON)
    res = json.loads((up / "upgrade.json").read_text())
    t, i = res["teacher"], res["rsae_init"]
    assert i["mse"] == pytest.approx(t["mse"], rel=0.02)
    assert i["l0"] == pytest.approx(t["l0"], rel=0.02)
    assert res["settings"]["gate"] == "jumprelu"  # a BatchTopK-style teacher: its global threshold
    assert (res["settings"]["teacher_mechanism"], res["settings"]["teacher_architecture"]) == ("batchtopk", "matryoshka")
    assert json.loads((up / "metrics.json").read_text())["status"] == "ok"


def test_the_control_can_drop_the_nested_loss(tmp_path):
    """upgrade.control_architecture=batchtopk fine-tunes the Matryoshka teacher's weights as BatchTopK:
    no nested-prefix loss terms, exported as BatchTopK; an architecture the teacher does not derive
    from is refused before anything trains."""
    teacher, up = tmp_path / "teacher", tmp_path / "upgrade"
    run_train("sae=matryoshka", "sae.k=4", "trainer.max_steps=60", "trainer.val_check_interval=60",
              f"hydra.run.dir={teacher}", *COMMON)
    args = ("sae=rational", f"teacher.path={teacher}/sae", "upgrade.steps=20", "upgrade.calibration_tokens=2048",
            "upgrade.calibration_steps=20", *COMMON)
    bad = run_train(*args, "upgrade.control_architecture=relu", f"hydra.run.dir={tmp_path / 'bad'}", check=False)
    assert bad.returncode != 0
    assert "upgrade.control_architecture=relu: the teacher is a matryoshka SAE" in bad.stderr
    assert not (tmp_path / "bad" / "rsae").exists()
    run_train(*args, "upgrade.control_architecture=batchtopk", "trainer.log_every_n_steps=5", f"hydra.run.dir={up}")
    res = json.loads((up / "upgrade.json").read_text())
    assert res["settings"]["control_architecture"] == "batchtopk" and "teacher_ft" in res
    exported = json.loads((up / "teacher_ft" / "cfg.json").read_text())
    assert exported["rsae_architecture"] == "batchtopk" and "matryoshka_widths" not in exported
    header = (up / "csv" / "teacher_ft" / "metrics.csv").read_text().splitlines()[0]
    assert "train/mse" in header and "mse_" not in header.replace("train/mse,", "").replace("train/mse\n", "")
