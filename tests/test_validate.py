"""The pre-flight config check (rsae.validate) and the strict JSON writer (rsae.jsonfile)."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

import rsae.config  # noqa: F401  (registers the config resolvers)
from conftest import ROOT
from rsae import jsonfile
from rsae.errors import ConfigError
from rsae.validate import check_config
from rsae.validate_upgrade import check_overrides


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def error(cfg, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        check_config(cfg, **kw)
    return str(info.value)


@pytest.mark.parametrize("option", sorted(p.stem for p in (ROOT / "conf" / "sae").glob("*.yaml")))
def test_defaults_pass(option):
    group = f"sae={option}"
    check_config(config(group, "data=synthetic"))
    check_config(config(group))  # data=activations: d_in unknown until the cache is read


@pytest.mark.parametrize("overrides,message", [
    (("sae.k=abc",), "sae.k must be an integer in [1, d_sae=256], got 'abc'"),
    (("sae.k=3.5",), "sae.k must be an integer in [1, d_sae=256], got 3.5"),
    (("sae.k=true",), "sae.k must be an integer in [1, d_sae=256], got True"),
    (("module.lr=0",), "module.lr must be a finite number > 0, got 0"),
    (("module.decay_fraction=1.5",), "module.decay_fraction must be a finite number in [0, 1], got 1.5"),
    (("module.grad_clip=0",), "module.grad_clip must be a finite number > 0 or null, got 0"),
    (("trainer.log_every_n_steps=0",), "trainer.log_every_n_steps must be an integer >= 1, got 0"),
    (("trainer.devices=0",), "trainer.devices must be an integer >= 1, -1 (all), 'auto' or a list of device indices, got 0"),
    (("data.max_magnitude=0.1",), "data.max_magnitude must be a finite number >= data.min_magnitude=0.5, got 0.1"),
    (("sae=jumprelu", "sae.bandwidth=0"), "sae.bandwidth must be a finite number > 0, got 0"),
    (("sae=batchtopk", "sae.threshold_ema=0"), "sae.threshold_ema must be a finite number in (0, 1], got 0"),
    (("sae=rational", "sae.gate=topk"), "sae.gate=topk needs sae.k"),
    (("sae=rational", "sae.degrees=[5]"), "sae.degrees must be a list of 2 numbers each >= 0 or null, got [5]"),
    (("sae.d_sae=100",), "give exactly one of sae.d_sae and sae.expansion_factor"),
    (("target_l0=-1",), "target_l0 must be a finite number > 0 or null, got -1"),
])
def test_bad_value_names_key_range_and_value(overrides, message):
    assert error(config("data=synthetic", *overrides)).startswith(message)


def test_whole_number_floats_count_as_integers():
    # Hydra reads `1e6` as a float; a whole number is accepted and written back as an int
    cfg = config("data=synthetic", "sae=topk", "sae.dead_after_tokens=1e9", "trainer.val_check_interval=null")
    check_config(cfg)
    assert cfg.sae.dead_after_tokens == 10**9 and isinstance(cfg.sae.dead_after_tokens, int)
    assert error(config("data=synthetic", "sae.dead_after_tokens=1.5e0")).startswith(
        "sae.dead_after_tokens must be an integer >= 1, got 1.5")


def test_activation_settings_and_d_in_dependent_bounds():
    assert error(config("data.val_fraction=1")) == "data.val_fraction must be a finite number in (0, 1), got 1"
    assert error(config("data.storage_dtype=int8")) == "data.storage_dtype must be one of bfloat16, float32, got 'int8'"
    cfg = config("sae.k=5000")  # data=activations: d_in comes from the cache's manifest
    check_config(cfg)  # nothing to compare k with yet
    assert error(cfg, d_in=576) == "sae.k must be an integer in [1, d_sae=2304], got 5000"


def test_memory_is_bounded_by_the_device():
    cfg = config("data=synthetic", "sae.expansion_factor=null", "sae.d_sae=65536")
    check_config(cfg, device_memory=("RAM", 10**12))
    message = error(cfg, device_memory=("RAM", 10**8))
    assert "d_in=64 x d_sae=65536" in message and "RAM has 100 MB free" in message


def test_upgrade_and_eval_sections():
    assert error(config("experiment=rsae_upgrade", "upgrade.hold_l0_rate=0")).startswith("upgrade.hold_l0_rate must be")
    assert error(config("sae=rational", "teacher.path=t", "upgrade.steps=0")) == "upgrade.steps must be an integer >= 1 or null, got 0"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["eval.probe_test_fraction=1"])
    assert error(cfg) == "eval.probe_test_fraction must be a finite number in (0, 1), got 1"


def test_json_is_strict(tmp_path):
    data = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -math.inf}, "t": torch.tensor(float("nan")),
            "u": torch.tensor(2.5), "ok": 1, "s": "x", "n": None}
    jsonfile.write_json(tmp_path / "m.json", data)

    def reject(constant):
        raise ValueError(constant)

    back = json.loads((tmp_path / "m.json").read_text(), parse_constant=reject)
    assert back == {"a": None, "b": [1.0, None], "c": {"d": None}, "t": None, "u": 2.5, "ok": 1, "s": "x", "n": None}


def test_harvest_hooks_are_names():
    check_config(config("data.harvest_hooks=[resid_post,attn_out]"))
    assert error(config("data.harvest_hooks=[3]")) == "data.harvest_hooks must be a hook name or a non-empty list of them or null, got [3]"


def test_upgrade_layout_sae_group_holds_the_rsae_settings():
    check_config(config("sae=rational", "teacher.path=t", "data=synthetic"))  # the upgrade's defaults pass
    check_config(config("experiment=paper_gpt2_relu"))
    assert error(config("sae=rational", "teacher.path=t", "sae.degrees=[5]")) == \
        "sae.degrees must be a list of 2 numbers each >= 0 or null, got [5]"
    assert error(config("sae=rational", "teacher.path=t", "sae.gate=sigmoid")) == \
        "sae.gate must be one of none, relu, jumprelu, topk, teacher, got 'sigmoid'"
    assert error(config("sae=rational", "teacher.path=t", "sae.c_in_init=2")).startswith(
        "sae.c_in_init must be null in an upgrade (teacher.path set): calibration sets C_in and C_out")
    assert error(config("sae=relu", "teacher.path=t")).startswith(
        "teacher.path upgrades a teacher to a Rational SAE: add sae=rational")
    # A setting of the RSAE under upgrade. names where it moved, from YAML or the command line.
    assert error(config("sae=rational", "teacher.path=t", "+upgrade.sharing=latent")).startswith(
        "upgrade.sharing moved to sae.sharing: ")
    with pytest.raises(ConfigError, match=r"^upgrade.degrees moved to sae.degrees: "):
        check_overrides(["sae=rational", "upgrade.degrees=[3,2]"])
    check_overrides(["upgrade.steps=5", "sae.degrees=[3,2]", "--cfg", "job"])


def test_gate_choices_come_from_the_masks_and_teacher_needs_one():
    from rsae.sae.mechanisms import MASKS

    assert error(config("sae=rational", "sae.gate=sigmoid")) == f"sae.gate must be one of {', '.join(MASKS)}, got 'sigmoid'"
    assert error(config("sae=rational", "sae.gate=teacher")).startswith("sae.gate=teacher needs teacher.path")


@pytest.mark.parametrize("override,key", [("cache_only=true", "cache_only"), ("ckpt_path=/x.ckpt", "ckpt_path"),
                                          ("target_l0=32", "target_l0")])
def test_training_only_settings_are_refused_in_an_upgrade(tmp_path, override, key):
    assert error(config("sae=rational", f"teacher.path={tmp_path}", override)).startswith(f"{key} does not apply to an upgrade")


def test_a_setting_of_another_architecture_under_upgrade_is_not_said_to_have_moved():
    msg = error(config("sae=rational", "teacher.path=/t", "+upgrade.group_sizes=[4]"))
    assert msg.startswith("upgrade.group_sizes is not an upgrade setting")
