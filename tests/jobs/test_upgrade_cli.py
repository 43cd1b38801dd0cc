"""The RSAE upgrade end to end on synthetic data: train a teacher, upgrade it, read upgrade.json.

The command is `train.py sae=rational teacher.path=<dir>`: the RSAE's settings are sae.*, the
phases' upgrade.*; `experiment=rsae_upgrade` is an alias of it."""

import json

import pytest
import torch
import yaml

from conftest import run_train
from rsae.io.saelens import load_sae

COMMON = ("data=synthetic", "logger=csv", "data.batch_size=256", "data.d_in=16", "data.n_features=64")


@pytest.mark.parametrize("sae", ["relu", "jumprelu", "topk"])
def test_upgrade_reproduces_teacher_then_fine_tunes(tmp_path, sae):
    teacher, up = tmp_path / "teacher", tmp_path / "upgrade"
    k = ("sae.k=4",) if sae == "topk" else ()
    run_train(f"sae={sae}", *k, "trainer.max_steps=150", "trainer.val_check_interval=150", f"hydra.run.dir={teacher}", *COMMON)
    run_train("sae=rational", f"teacher.path={teacher}/sae", "upgrade.steps=40",
              "upgrade.calibration_tokens=4096", "upgrade.calibration_steps=50", f"hydra.run.dir={up}", *COMMON)
    res = json.loads((up / "upgrade.json").read_text())
    assert set(res) >= {"teacher", "rsae_init", "rsae", "teacher_ft", "settings", "seconds"}
    # Where the time went: every phase that ran is timed.
    assert {"setup", "calibrate", "finetune_rsae", "finetune_teacher_ft", "eval_rsae", "setup_cache"} <= set(res["seconds"])
    assert all(v >= 0 for v in res["seconds"].values()) and res["seconds"]["finetune_rsae"] > 0
    assert res["seconds"]["setup_cache"] <= res["seconds"]["setup"]
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
    args = ("sae=rational", f"teacher.path={teacher}/sae", "upgrade.steps=10", "upgrade.calibration_tokens=2048",
            "upgrade.calibration_steps=10", "upgrade.control=false", f"hydra.run.dir={up}", *COMMON)
    run_train(*args)
    first = json.loads((up / "upgrade.json").read_text())
    stamp = (up / "rsae" / "sae_weights.safetensors").stat().st_mtime_ns
    run_train(*args)  # everything is done: nothing is recomputed
    assert (up / "rsae" / "sae_weights.safetensors").stat().st_mtime_ns == stamp
    again = json.loads((up / "upgrade.json").read_text())
    assert again["rsae"] == first["rsae"]
    assert again["settings"]["calibration"] == first["settings"]["calibration"]  # kept by the rerun
    # A rerun that asks for other RSAE settings (same tensor shapes) is refused, not served old results.
    proc = run_train(*args, "sae.t_max=4.0", check=False)
    assert proc.returncode == 1 and "sae.t_max" in proc.stderr and "other settings" in proc.stderr


def test_a_zero_gate_lr_scale_freezes_the_gate_while_the_rest_fine_tunes(tmp_path):
    teacher, up = tmp_path / "teacher", tmp_path / "upgrade"
    run_train("sae=relu", "trainer.max_steps=50", "trainer.val_check_interval=50", f"hydra.run.dir={teacher}", *COMMON)
    run_train("sae=rational", f"teacher.path={teacher}/sae", "upgrade.steps=20", "upgrade.calibration_tokens=2048",
              "upgrade.calibration_steps=10", "upgrade.control=false", "upgrade.gate_lr_scale=0", f"hydra.run.dir={up}",
              *COMMON)
    init, tuned = load_sae(up / "rsae_init").state_dict(), load_sae(up / "rsae").state_dict()
    gate = [k for k in init if k.startswith("rational_gate.")]
    assert gate and all(torch.equal(init[k], tuned[k]) for k in gate)
    assert not torch.equal(init["W_enc"], tuned["W_enc"])
    proc = run_train("sae=rational", f"teacher.path={teacher}/sae", "upgrade.gate_lr_scale=-1", f"hydra.run.dir={up}2",
                     *COMMON, check=False)
    assert proc.returncode != 0 and "gate_lr_scale" in proc.stderr


def test_upgrade_rejects_missing_teacher(tmp_path):
    proc = run_train("sae=rational", f"teacher.path={tmp_path}/nothing", f"hydra.run.dir={tmp_path}/u", *COMMON, check=False)
    assert proc.returncode == 1 and "teacher SAE directory does not exist" in proc.stderr


def test_sae_settings_act_and_are_logged_and_the_alias_runs_the_same(tmp_path):
    teacher = tmp_path / "teacher"
    run_train("sae=relu", "sae.l1_coefficient=3", "trainer.max_steps=50", "trainer.val_check_interval=50",
              f"hydra.run.dir={teacher}", *COMMON)
    phases = ("upgrade.steps=10", "upgrade.calibration_tokens=2048", "upgrade.calibration_steps=10", "upgrade.control=false")
    gate = ("sae.sharing=latent", "sae.degrees=[3,2]", "sae.sparsity=codes")
    new, alias = tmp_path / "new", tmp_path / "alias"
    run_train("sae=rational", f"teacher.path={teacher}/sae", *gate, *phases, f"hydra.run.dir={new}", *COMMON)
    run_train("experiment=rsae_upgrade", f"teacher.path={teacher}/sae", *gate, *phases, f"hydra.run.dir={alias}", *COMMON)
    res_new, res_alias = (json.loads((d / "upgrade.json").read_text()) for d in (new, alias))
    for phase in ("teacher", "rsae_init", "rsae"):
        assert res_new[phase] == res_alias[phase]
    assert json.loads((alias / "metrics.json").read_text())["upgrade/rsae/fvu"] == res_new["rsae"]["fvu"]
    # The config the run logged and saved is the one that acted: sae.* as the RSAE was built
    # (teacher-derived values filled in), no training-only keys.
    logged = json.loads((new / "config.json").read_text())
    sae = logged["sae"]
    assert (sae["gate"], sae["degrees"], sae["init_table"], sae["sharing"], sae["sparsity"]) == ("relu", [3, 2], "relu_3_2", "latent", "codes")
    assert sae["l1_coefficient"] == 3.0 and sae["d_sae"] == 64 and sae["unit_norm_decoder"] is False  # the teacher's
    assert not {"c_in_init", "init_seed", "expansion_factor"} & set(sae)
    assert "callbacks" not in logged and "max_steps" not in logged["trainer"] and "lr" not in logged["module"]
    assert logged["upgrade"]["steps"] == 10 and logged["job"] == "upgrade"
    assert yaml.safe_load((new / "csv" / "rsae" / "hparams.yaml").read_text())["sae"] == sae
    assert res_new["settings"]["rsae_sae_config"] == sae
    export = json.loads((new / "rsae" / "cfg.json").read_text())
    assert (export["sharing"], export["degrees"], export["sparsity"]) == ("latent", [3, 2], "codes")
    assert export["metadata"]["rsae_sae_config"] == sae


@pytest.mark.parametrize("override,moved", [("upgrade.degrees=[3,2]", "sae.degrees"), ("upgrade.gate=none", "sae.gate"),
                                            ("+upgrade.l1_coefficient=2", "sae.l1_coefficient")])
def test_a_gate_setting_under_upgrade_says_where_it_moved(tmp_path, override, moved):
    proc = run_train("sae=rational", f"teacher.path={tmp_path}", override, f"hydra.run.dir={tmp_path}/u", *COMMON, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: {override.lstrip('+').split('=')[0]} moved to {moved}: ")


def test_teacher_path_needs_the_rational_group(tmp_path):
    proc = run_train("sae=topk", f"teacher.path={tmp_path}", f"hydra.run.dir={tmp_path}/u", *COMMON, check=False)
    assert proc.returncode == 1 and "teacher.path upgrades a teacher to a Rational SAE: add sae=rational" in proc.stderr
