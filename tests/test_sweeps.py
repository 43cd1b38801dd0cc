"""Every W&B sweep file expands to Hydra overrides that compose into a valid train config."""

import itertools
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

import rsae.config  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def parameter_values(spec: dict) -> list:
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    if "min" in spec and "max" in spec:  # a distribution: check both ends
        return [spec["min"], spec["max"]]
    raise AssertionError(f"unsupported parameter spec {spec}")


def expand(sweep: dict) -> list[list[str]]:
    names = list(sweep["parameters"])
    grids = [parameter_values(sweep["parameters"][n]) for n in names]
    return [[f"{n}={v}" for n, v in zip(names, combo)] for combo in itertools.product(*grids)]


def test_there_are_sweeps():
    assert len(SWEEPS) >= 4


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_composes(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] in ("train.py", "evaluate.py")
    assert "${args_no_hyphens}" in sweep["command"] and "${program}" in sweep["command"]
    assert sweep["metric"]["name"].startswith(("val/", "upgrade/", "objective/"))
    combos = expand(sweep)
    assert combos
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for overrides in combos:
            cfg = compose(config_name=sweep["program"].removesuffix(".py"), overrides=overrides, return_hydra_config=False)
            for o in overrides:  # every swept key really exists and took the value
                key, value = o.split("=", 1)
                if key in ("sae", "logger", "data", "experiment", "trainer"):
                    continue
                from omegaconf import OmegaConf

                assert str(OmegaConf.select(cfg, key)) == str(yaml.safe_load(value)), o
