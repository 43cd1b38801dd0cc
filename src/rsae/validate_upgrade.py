"""Pre-flight checks of the upgrade's layout (`python train.py sae=rational teacher.path=<dir>`).

The RSAE's settings are the sae group's (conf/sae/rational.yaml), the phases' are `upgrade.*`
(conf/upgrade/default.yaml). A setting of the RSAE given under `upgrade.` is refused with one line
that names the key it moved to, on the command line (`check_overrides`, before Hydra composes:
Hydra's own error would not say where the key went) and in a composed config (`check_upgrade`).
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from rsae.errors import ConfigError
from rsae.sae.mechanisms import GATES
from rsae.sae.base import SAE as SAEBase
from rsae.sae.rational import RationalSAE
from rsae.config_rules import SAE, SAE_BY_TARGET, UPGRADE, Choice, Float, check_rule, get_dotted

# Keys of the sae group an upgrade does not use (calibration sets C_in, C_out; the teacher's
# weights replace the initial ones): they must be null there.
SCRATCH_ONLY = ("c_in_init", "c_out_init", "init_seed")
# Settings of the RSAE itself (its constructor's): under upgrade. they are refused with the key they moved to.
RSAE_KEYS = frozenset(p for cls in (RationalSAE, SAEBase) for p in inspect.signature(cls).parameters) - {"kw", "kwargs"}
# Settings of a training run the upgrade has no use for: refused rather than silently ignored.
NOT_FOR_UPGRADE = {
    "cache_only": "build the cache with a training command (cache_only=true without teacher.path)",
    "ckpt_path": "an upgrade resumes when rerun in the same hydra.run.dir",
    "target_l0": "the upgrade holds L0 at the teacher's (upgrade.hold_l0)",
}
UPGRADE_SAE = {**SAE, **SAE_BY_TARGET["RationalSAE"], "gate": Choice(*GATES, "teacher"),
               "l1_coefficient": Float(0, null=True), "l0_coefficient": Float(0, null=True)}


def moved_error(key: str) -> str:
    return (f"upgrade.{key} moved to sae.{key}: the RSAE's settings are the sae group's (conf/sae/rational.yaml), "
            "upgrade.* holds the phases' (conf/upgrade/default.yaml)")


def scratch_only_error(key: str) -> str:
    why = "the teacher's weights replace the initial ones" if key == "init_seed" else \
        "calibration sets C_in and C_out from the teacher's pre-activations"
    return f"sae.{key} must be null in an upgrade (teacher.path set): {why}"


def check_overrides(args: Iterable[str]) -> None:
    """Refuse `upgrade.<key>=...` on a command line when <key> is a setting of the RSAE."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        section, _, name = key.partition(".")
        if section == "upgrade" and name in RSAE_KEYS and name not in UPGRADE:
            raise ConfigError(moved_error(name))


def check_upgrade(cfg: DictConfig, refs: dict[str, Any]) -> None:
    """The upgrade block holds phase settings only; an upgrade has a teacher and a rational sae group."""
    up = cfg.get("upgrade")
    for key in up if OmegaConf.is_dict(up) else ():
        if key in RSAE_KEYS and key not in UPGRADE:
            raise ConfigError(moved_error(key))
        if key not in UPGRADE:
            raise ConfigError(f"upgrade.{key} is not an upgrade setting (those are {', '.join(UPGRADE)})")
    teacher = cfg.get("teacher")
    has_path = OmegaConf.is_dict(teacher) and (OmegaConf.is_missing(teacher, "path") or teacher.get("path") is not None)
    if cfg.get("job", "train") != "upgrade":
        if has_path:
            raise ConfigError(f"teacher.path is set but job={cfg.get('job')}: drop job= to upgrade the teacher, or "
                              "teacher.path to train from scratch")
        return
    if not has_path or OmegaConf.is_missing(teacher, "path"):
        raise ConfigError("teacher.path must name the exported SAE to upgrade (rsae / SAELens dir, ae.pt or sae.safetensors)")
    target = str(get_dotted(cfg, "sae._target_") or "")
    if not target.endswith("RationalSAE"):
        raise ConfigError(f"teacher.path upgrades a teacher to a Rational SAE: add sae=rational (the sae group is {target or 'missing'})")
    for key, why in NOT_FOR_UPGRADE.items():
        if cfg.get(key) not in (None, False):
            raise ConfigError(f"{key} does not apply to an upgrade (teacher.path set): {why}")
    for key in SCRATCH_ONLY:
        if get_dotted(cfg, f"sae.{key}") is not None:
            raise ConfigError(scratch_only_error(key))
    for key, rule in UPGRADE_SAE.items():
        if key not in SCRATCH_ONLY:
            check_rule(cfg, f"sae.{key}", rule, refs)  # d_sae-dependent bounds wait for the teacher
