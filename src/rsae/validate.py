"""Pre-flight checks of a composed config: every numeric setting, before anything heavy loads.

One table per config section (`rsae.config_rules`) maps each key to its type and allowed range; `check_config(cfg)`
runs them all on the composed config (keys a config lacks are skipped) and raises `ConfigError`
with one line naming the key, the allowed range and the value given:

    sae.k must be an integer in [1, d_sae=512], got 'abc'

Bounds that depend on the data's width (`k <= d_sae = expansion_factor * d_in`) are checked once
d_in is known: at once when the config sets it (`data=synthetic`), else after the activation
cache's manifest is read and before the SAE is allocated (`check_config(cfg, d_in=...)`). The same
call refuses an SAE whose training state (weights, gradients, Adam's two moments, one batch of
codes) would not fit the memory of the device it trains on.

The architectures' constructors keep their own checks (they are also built from Python); these
tables are what a command line meets first.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from rsae.config_rules import (DATA, EVAL, MISSING, MODULE, SAE, SAE_BY_TARGET, TOP, TRAINER, UPGRADE, check_rule, get_dotted,
                               int_or_none)
from rsae.errors import ConfigError
from rsae.sae.mechanisms import GATES
from rsae.validate_upgrade import check_upgrade

# Bytes per SAE parameter in training (float32 weight, gradient, Adam's two moments) and per
# batch row x latent (pre-activations, codes and their gradients, float32).
BYTES_PER_PARAM = 16
BYTES_PER_CODE = 16


def check_config(cfg: DictConfig, d_in: int | None = None, device_memory: tuple[str, int] | None = None) -> None:
    """Raise ConfigError (one line) for the first setting of `cfg` outside its allowed range.

    `d_in`: the data's width when known (else `data.d_in` if the config sets it); with it come
    the bounds on d_sae and the memory check (`device_memory`: (name, bytes) overrides the
    device's free memory, for tests)."""
    values = cfg
    d_in = d_in if d_in is not None else int_or_none(get_dotted(values, "data.d_in"))
    refs: dict[str, Any] = {"d_in": d_in}
    for key, rule in TOP.items():
        check_rule(values, key, rule, refs)
    for section, table in (("trainer", TRAINER), ("module", MODULE), ("data", DATA), ("upgrade", UPGRADE), ("eval", EVAL)):
        if OmegaConf.is_dict(cfg.get(section)):
            for key, rule in table.items():
                check_rule(values, f"{section}.{key}", rule, refs)
    _check_hook_points(cfg)
    if cfg.get("job", "train") == "upgrade" or OmegaConf.is_dict(cfg.get("upgrade")):
        check_upgrade(cfg, refs)  # the upgrade's layout; the sae group when upgrading
    if OmegaConf.is_dict(cfg.get("sae")) and cfg.get("job", "train") == "train":
        _check_sae(cfg, refs, device_memory)


def _check_hook_points(cfg: DictConfig) -> None:
    """Several hook points (lists in lm.hook / lm.layer) only harvest: a run trains one SAE."""
    hook, layer = get_dotted(cfg, "data.hook"), get_dotted(cfg, "data.layer")
    if hook is MISSING or cfg.get("cache_only"):
        return
    several = [v for v in (hook, layer) if isinstance(v, list) and len(v) > 1]
    if several:
        listed = ",".join(str(v) for v in several[0])
        key = "lm.layer" if several[0] is layer else "lm.hook"
        raise ConfigError(f"{key}=[{listed}] names several hook points but a run trains one SAE: harvest them in one "
                          f"pass with cache_only=true, then train one per trial with -m {key}={listed} (or both at "
                          f"once: -m {key}={listed} data.harvest_{key[3:]}s=[{listed}])")


def _check_sae(values: DictConfig, refs: dict[str, Any], device_memory: tuple[str, int] | None) -> None:
    sae = {k: get_dotted(values, f"sae.{k}") for k in values.sae}
    rules = {**SAE, **SAE_BY_TARGET.get(str(sae.get("_target_", "")).rsplit(".", 1)[-1], {})}
    if sae.get("gate") == "teacher":
        raise ConfigError(f"sae.gate=teacher needs teacher.path (the SAE to upgrade); from scratch choose one of {', '.join(GATES)}")
    for key in ("d_in", "d_sae", "expansion_factor"):
        check_rule(values, f"sae.{key}", rules[key], refs)
    sae = {k: get_dotted(values, f"sae.{k}") for k in values.sae}  # as normalised by the checks (1e6 -> 1000000)
    if (sae.get("d_sae") is None) == (sae.get("expansion_factor") is None) and "expansion_factor" in sae:
        raise ConfigError(f"give exactly one of sae.d_sae and sae.expansion_factor (the other null), got "
                          f"d_sae={sae.get('d_sae')}, expansion_factor={sae.get('expansion_factor')}")
    d_in = refs["d_in"]
    if sae.get("d_in") is not None and d_in is not None and sae["d_in"] != d_in:
        raise ConfigError(f"sae.d_in={sae['d_in']} does not match the data's d_in={d_in}")
    d_sae = sae.get("d_sae")
    if d_sae is None and d_in is not None:
        d_sae = sae["expansion_factor"] * d_in
    refs["d_sae"] = d_sae
    for key, rule in rules.items():
        if key not in ("d_in", "d_sae", "expansion_factor"):
            check_rule(values, f"sae.{key}", rule, refs)
    if sae.get("gate") == "topk" and sae.get("k") is None:
        raise ConfigError("sae.gate=topk needs sae.k (an integer in [1, d_sae])")
    _check_memory(values, d_in, d_sae, device_memory)


def _check_memory(values: DictConfig, d_in: int | None, d_sae: int | None, device_memory: tuple[str, int] | None) -> None:
    """Refuse an SAE whose training state cannot fit the device (d_in unknown: at least 1)."""
    if d_sae is None:
        return
    width = d_in or 1
    batch = int_or_none(get_dotted(values, "data.batch_size")) or 1
    params = 2 * width * d_sae + d_sae + width
    need = params * BYTES_PER_PARAM + batch * d_sae * BYTES_PER_CODE
    name, available = device_memory or available_memory(get_dotted(values, "trainer.accelerator"))
    if available is not None and need > available:
        shape = f"d_in={d_in} x d_sae={d_sae}" if d_in else f"d_sae={d_sae} (with any d_in)"
        raise ConfigError(f"the SAE ({shape}, batch {batch}) needs about {_bytes(need)} to train (weights, gradients, "
                          f"Adam state, codes) but {name} has {_bytes(available)} free: lower sae.d_sae / "
                          f"sae.expansion_factor or data.batch_size")


def available_memory(accelerator: Any) -> tuple[str, int | None]:
    """(what, free bytes) of the memory the SAE trains in: the GPU's when training on CUDA, else RAM."""
    import torch

    if str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return f"GPU {torch.cuda.get_device_name()}", int(free)
    try:
        import psutil

        return "RAM", int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no estimate: no check
        return "RAM", None


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
