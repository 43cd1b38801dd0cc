"""Every config group option composes; plugin presets compose when their plugins are installed."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import rsae.config  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["sae", "data", "trainer", "logger", "callbacks", "module"])
def test_group_options_compose(group):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for option in _options(group):
            cfg = compose(config_name="train", overrides=[f"{group}={option}"])
            assert cfg is not None


@pytest.mark.parametrize("preset", _options("hparams_search"))
def test_optuna_presets_compose(preset):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hparams_search={preset}"], return_hydra_config=True)
        assert "OptunaSweeper" in cfg.hydra.sweeper._target_
        assert cfg.optimized_metric == "objective/fvu_at_target_l0"
        assert len(cfg.hydra.sweeper.params) >= 2


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
        assert "SlurmLauncher" in cfg.hydra.launcher._target_
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.partition == "gpu"


def test_default_launcher_is_one_process_per_trial():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith("SubprocessLauncher")
        assert cfg.hydra.job.chdir is False


def test_derived_values_are_interpolated():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=synthetic", "data.d_in=32"])
        assert OmegaConf.select(cfg, "sae.d_in") == 32
