"""The upgrade's settings: the RSAE from the `sae` group, the config that acted.

`python train.py sae=rational teacher.path=<dir>` builds the RSAE with `RationalSAE.from_teacher`
from the sae group's values (conf/sae/rational.yaml): every key goes to it as it is, except

* the sizes: d_in, d_sae and expansion_factor are the teacher's (a value given must equal them);
* scratch-only keys (c_in_init, c_out_init, init_seed): calibration sets C_in, C_out and the
  teacher's weights replace the initial ones, so they must be null;
* nulls that the teacher resolves: l1_coefficient (the teacher's recorded one, else 5),
  l0_coefficient (the control's), and in from_teacher gate=teacher, degrees, init_table and k.

`acted_config` is what the upgrade logs and saves: the config with the sae group replaced by the
values the RSAE was built with, and without the keys an upgrade does not read.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from rsae.errors import ConfigError
from rsae.sae import SAE
from rsae.validate_upgrade import SCRATCH_ONLY, scratch_only_error

# Keys of the composed config that the upgrade does not read or sets itself: the fine-tunes take their
# steps, lr and warm-up from upgrade.*, log every step, validate and checkpoint never, and no
# training callback runs.
NOT_READ = {"trainer": ("max_steps", "limit_val_batches", "enable_checkpointing"),
            "module": ("lr", "warmup_steps", "log_every_n_steps")}
NOT_READ_TOP = ("callbacks", "ckpt_path", "cache_only", "target_l0", "target_l0_weight")


def teacher_coefficient(meta: dict, name: str, fallback: float) -> float:
    """The sparsity coefficient an rsae-trained teacher used, else `fallback`."""
    value = (meta.get("rsae_sae_config") or {}).get(name)
    return float(value) if isinstance(value, (int, float)) else float(fallback)


def from_teacher_kwargs(cfg: DictConfig, teacher: SAE, meta: dict, control_l0: float) -> dict[str, Any]:
    """The keywords `RationalSAE.from_teacher(teacher, **kw)` gets from the sae group."""
    sae = OmegaConf.to_container(cfg.sae, resolve=True)
    target = str(sae.pop("_target_", ""))
    if not target.endswith("RationalSAE"):
        raise ConfigError(f"teacher.path upgrades a teacher to a Rational SAE: use sae=rational, got sae._target_={target}")
    d_in, d_sae, factor = (sae.pop(k, None) for k in ("d_in", "d_sae", "expansion_factor"))
    if d_in is not None and int(d_in) != teacher.d_in:
        raise ConfigError(f"sae.d_in={d_in} does not match the teacher's d_in={teacher.d_in}")
    given = d_sae if d_sae is not None else (factor * teacher.d_in if factor is not None else None)
    if given is not None and int(given) != teacher.d_sae:
        key = "sae.d_sae" if d_sae is not None else "sae.expansion_factor"
        raise ConfigError(f"{key}={d_sae if d_sae is not None else factor} gives d_sae={given} but the teacher has "
                          f"d_sae={teacher.d_sae}: an upgrade keeps the teacher's size (leave {key} null)")
    for key in SCRATCH_ONLY:
        if sae.pop(key, None) is not None:
            raise ConfigError(scratch_only_error(key))
    if sae.get("l1_coefficient") is None:
        sae["l1_coefficient"] = teacher_coefficient(meta, "l1_coefficient", 5.0)
    if sae.get("l0_coefficient") is None:
        sae["l0_coefficient"] = float(control_l0)
    return sae


def acted_sae_config(cfg: DictConfig, rsae, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The RSAE's settings as built: the keywords with the teacher-derived values filled in."""
    g = rsae.rational_gate
    return {"_target_": str(cfg.sae._target_), "d_in": rsae.d_in, "d_sae": rsae.d_sae, **kwargs,
            "gate": rsae.gate, "degrees": list(g.degrees), "init_table": g.init_table, "k": rsae.k}


def acted_config(cfg: DictConfig, sae: dict[str, Any], upgrade: dict[str, Any]) -> dict[str, Any]:
    """The upgrade's config as it acted (resolved): `sae` the RSAE's settings, `upgrade` with the
    values the teacher resolved (`steps`, `control_l0_coefficient`), no keys the upgrade does not read."""
    out = OmegaConf.to_container(cfg, resolve=True)
    out["sae"] = sae
    out["upgrade"].update(upgrade)
    for section, keys in NOT_READ.items():
        for key in keys:
            (out.get(section) or {}).pop(key, None)
    for key in NOT_READ_TOP:
        out.pop(key, None)
    return out
