"""The rules of the config check: a `Rule` per key (type, range, null allowed, bounds that name
other settings such as `d_sae`), the tables of every config section, and the engine that applies a
rule to a composed config with a one-line `ConfigError`. `rsae.validate` runs the tables;
`rsae.validate_upgrade` adds the upgrade's layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rsae.errors import ConfigError
from rsae.sae.mechanisms import GATES

MISSING = object()


@dataclass(frozen=True)
class Rule:
    kind: str  # int | float | bool | choice | list (of `item`) | scales (name -> float) | devices | layers | names
    lo: float | str | None = None  # lower bound; a string names another value ("d_sae", "data.min_magnitude")
    hi: float | str | None = None
    lo_open: bool = False  # True: the bound itself is not allowed
    hi_open: bool = False
    null: bool = False  # null allowed
    choices: tuple = ()
    length: int | None = None  # for lists

    def describe(self, refs: dict[str, Any]) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(dict.fromkeys("null" if c is None else str(c) for c in self.choices))
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "layers":
            text = f"an integer >= {self.lo} or a list of them"
        elif self.kind == "names":
            text = "a hook name or a non-empty list of them"
        elif self.kind == "devices":
            text = "an integer >= 1, -1 (all), 'auto' or a list of device indices"
        elif self.kind == "scales":
            text = "a mapping of parameter-name prefixes to numbers >= 0 (0 freezes them)"
        elif self.kind == "list":
            text = f"a list of {self.length or ''} numbers".replace("  ", " ") + (" each" if self._range(refs) else "") + self._range(refs)
        else:
            text = {"int": "an integer", "float": "a finite number"}[self.kind] + self._range(refs)
        return text + (" or null" if self.null else "")

    def _range(self, refs: dict[str, Any]) -> str:
        lo, hi = _bound(self.lo, refs), _bound(self.hi, refs)
        if lo is not None and hi is not None:
            return f" in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f" {'>' if self.lo_open else '>='} {lo}"
        if hi is not None:
            return f" {'<' if self.hi_open else '<='} {hi}"
        return ""


def Int(lo=None, hi=None, **kw) -> Rule:  # noqa: N802 - table constructors
    return Rule("int", lo, hi, **kw)


def Float(lo=None, hi=None, **kw) -> Rule:  # noqa: N802
    return Rule("float", lo, hi, **kw)


def Choice(*choices, null: bool = False) -> Rule:  # noqa: N802
    return Rule("choice", choices=choices + ((None,) if null else ()))


BOOL = Rule("bool")
POSITIVE = Float(0, lo_open=True)
NON_NEGATIVE = Float(0)
COUNT = Int(1)
PRECISIONS = ("32-true", "32", 32, "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64", 64,
              "bf16", "16", 16, "transformer-engine", "transformer-engine-float16")

TRAINER = {
    "max_steps": COUNT, "val_check_interval": Int(1, null=True), "log_every_n_steps": COUNT, "devices": Rule("devices"),
    "num_nodes": COUNT, "precision": Choice(*PRECISIONS), "max_epochs": Int(-1, null=True),
    "limit_val_batches": NON_NEGATIVE, "num_sanity_val_steps": Int(-1), "accumulate_grad_batches": COUNT,
    "gradient_clip_val": Float(0, null=True), "enable_progress_bar": BOOL, "enable_model_summary": BOOL,
}
MODULE = {
    "lr": POSITIVE, "betas": Rule("list", 0, 1, hi_open=True, length=2), "warmup_steps": Int(0),
    "decay_fraction": Float(0, 1), "min_lr_ratio": Float(0, 1), "grad_clip": Float(0, lo_open=True, null=True),
    "log_every_n_steps": Int(1, null=True), "l0_tolerances": Rule("list", 0), "compile": BOOL, "cuda_graph": BOOL,
    "ddp_split_step": BOOL, "lr_scales": Rule("scales"),
    "compile_mode": Choice("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", null=True),
}
DATA = {
    # both data modules
    "batch_size": COUNT, "d_in": Int(1, null=True), "seed": Int(),
    # synthetic
    "n_features": COUNT, "mean_active": Float(0, "data.n_features", lo_open=True), "power_law": NON_NEGATIVE,
    "min_magnitude": NON_NEGATIVE, "max_magnitude": Float("data.min_magnitude"), "noise": NON_NEGATIVE,
    "val_batches": COUNT,
    # activations
    "n_tokens": COUNT, "context_size": Int(2), "val_fraction": Float(0, 1, lo_open=True, hi_open=True),
    "shuffle_buffer": COUNT, "block_rows": COUNT, "num_workers": Int(0), "shard_mb": POSITIVE,
    "harvest_batch_size": Int(1, null=True), "layer": Rule("layers", 0), "harvest_layers": Rule("layers", 0, null=True),
    "harvest_hooks": Rule("names", null=True),
    "storage_dtype": Choice("bfloat16", "float32"),
    "shuffle_device": Choice("cpu", "cuda"), "verify_checksums": BOOL, "exclude_special_tokens": BOOL,
    "prepend_bos": BOOL, "pin_memory": Rule("bool", null=True),
    # live
    "val_tokens": COUNT, "lm_batch_size": COUNT, "lm_device": Choice("auto", "cpu", "cuda"),
    "buffer_device": Choice("auto", "cpu", "cuda"),
}
SAE = {
    "d_in": Int(1, null=True), "d_sae": Int(1, null=True), "expansion_factor": Int(1, null=True),
    "k": Int(1, "d_sae"), "k_aux": Int(1, "d_sae", null=True), "aux_coefficient": NON_NEGATIVE,
    "l1_coefficient": NON_NEGATIVE, "l0_coefficient": NON_NEGATIVE, "l1_warmup_steps": Int(0),
    "l0_warmup_steps": Int(0), "threshold_ema": Float(0, 1, lo_open=True), "bandwidth": POSITIVE,
    "init_threshold": POSITIVE, "tanh_scale": POSITIVE, "threshold_lr_scale": POSITIVE,
    "penalty": Choice("step", "tanh"), "l0_target": Float(0, "d_sae", lo_open=True, null=True), "dead_after_tokens": COUNT, "unit_norm_decoder": BOOL,
    "init_seed": Int(null=True),
    # matryoshka
    "group_sizes": Rule("list", 0, lo_open=True, null=True),
    # rational
    "degrees": Rule("list", 0, length=2, null=True), "denominator": Choice("A", "B"),
    "sharing": Choice("shared", "group", "latent"), "n_groups": Int(1, "d_sae"), "scale_mode": Choice("scalar", "latent"),
    "c_in_init": POSITIVE, "c_out_init": Float(0, lo_open=True, null=True), "t_max": POSITIVE,
    "gate": Choice(*GATES), "sparsity": Choice("codes", "mask"),  # the rational SAE's masks (rsae.sae.mechanisms.MASKS)
}
SAE_BY_TARGET = {"RationalSAE": {"k": Int(1, "d_sae", null=True)},  # k only for gate=topk
                 "JumpReLUSAE": {"init_threshold": Float(0, lo_open=True, null=True)}}  # null: from l0_target
UPGRADE = {  # the upgrade's phases; the RSAE's own settings are the sae group's (rsae.validate_upgrade)
    "calibration_tokens": COUNT, "calibration_steps": Int(0),
    "steps": Int(1, null=True), "lr": POSITIVE, "gate_lr_scale": NON_NEGATIVE, "warmup_steps": Int(0), "hold_l0": BOOL, "hold_l0_rate": POSITIVE, "control": BOOL, "control_l0_coefficient": NON_NEGATIVE,
    "control_architecture": Choice("relu", "jumprelu", "topk", "batchtopk", "matryoshka", "gated", null=True),
    "eval_tokens": COUNT, "eval_batch_size": COUNT, "downstream": BOOL, "l0_tolerances": Rule("list", 0),
}
EVAL = {
    "n_tokens": COUNT, "batch_size": COUNT, "lm_batch_size": COUNT, "downstream": BOOL, "probing": BOOL,
    "probe_ks": Rule("list", 1), "probe_test_fraction": Float(0, 1, lo_open=True, hi_open=True),
    "probe_min_examples": COUNT, "n_frequent": Int(0), "n_random": Int(0), "n_examples": COUNT, "progress": BOOL,
    "l0_tolerances": Rule("list", 0), "autocast": Choice("auto", "none", "bfloat16", "float16"),
}
TOP = {"seed": Int(), "target_l0": Float(0, lo_open=True, null=True), "target_l0_weight": NON_NEGATIVE}


def check_rule(values: DictConfig, key: str, rule: Rule, refs: dict[str, Any]) -> None:
    value = get_dotted(values, key)
    if value is MISSING:
        return
    if rule.kind == "int" and isinstance(value, float) and value.is_integer():
        # `1e6` on a command line is a float to Hydra; a whole number is what was meant
        value = int(value)
        OmegaConf.update(values, key, value, merge=False)
    if not _ok(value, rule, values, refs):
        raise ConfigError(f"{key} must be {rule.describe(_known(rule, values, refs))}, got {show(value)}")


def _ok(value: Any, rule: Rule, values: DictConfig, refs: dict[str, Any]) -> bool:
    if value is None:
        return rule.null or (rule.kind == "choice" and None in rule.choices)
    kind = rule.kind
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "choice":
        return value in rule.choices and not isinstance(value, bool)
    if kind == "devices":
        if isinstance(value, str):
            return value == "auto" or all(p.strip().isdigit() for p in value.split(",") if p.strip()) and value.strip() != ""
        if isinstance(value, list):
            return bool(value) and all(_is_int(v) and v >= 0 for v in value)
        return _is_int(value) and (value >= 1 or value == -1)
    if kind == "layers":
        items = value if isinstance(value, list) and value else [value]
        return all(_is_int(v) and v >= rule.lo for v in items)
    if kind == "names":
        items = value if isinstance(value, list) and value else [value]
        return all(isinstance(v, str) and v.strip() != "" for v in items)
    if kind == "scales":
        return isinstance(value, dict) and all(_is_number(v) and v >= 0 for v in value.values())
    if kind == "list":
        if not isinstance(value, list) or (rule.length is not None and len(value) != rule.length):
            return False
        item = Rule("float", rule.lo, rule.hi, rule.lo_open, rule.hi_open)
        return all(_ok(v, item, values, refs) for v in value)
    if kind == "int" and not _is_int(value):
        return False
    if kind == "float" and not (_is_number(value) and math.isfinite(value)):
        return False
    lo, hi = _bound(rule.lo, {**refs, **_ref_values(rule, values)}), _bound(rule.hi, {**refs, **_ref_values(rule, values)})
    if lo is not None and (value < lo or (rule.lo_open and value == lo)):
        return False
    if hi is not None and (value > hi or (rule.hi_open and value == hi)):
        return False
    return True


def _ref_values(rule: Rule, values: DictConfig) -> dict[str, Any]:
    """Bounds that name another setting (e.g. data.min_magnitude), when it is a number."""
    out = {}
    for bound in (rule.lo, rule.hi):
        if isinstance(bound, str) and "." in bound:
            v = get_dotted(values, bound)
            out[bound] = v if _is_number(v) else None
    return out


def _known(rule: Rule, values: DictConfig, refs: dict[str, Any]) -> dict[str, Any]:
    return {**refs, **_ref_values(rule, values)}


def _bound(bound: float | str | None, refs: dict[str, Any]) -> Any:
    if isinstance(bound, str):
        value = refs.get(bound)
        return None if value is None else _Named(bound, value)
    return bound


class _Named(float):
    """A bound that prints as `name=value` (d_sae=512)."""

    def __new__(cls, name: str, value: float):
        obj = super().__new__(cls, value)
        obj.name = name
        return obj

    def __str__(self) -> str:
        value = int(self) if float(self).is_integer() else float(self)
        return f"{self.name}={value}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_or_none(value: Any) -> int | None:
    return value if _is_int(value) else None


def show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else "null" if value is None else str(value)


def get_dotted(cfg: DictConfig, dotted: str) -> Any:
    """The setting at `dotted`, interpolations resolved, as plain Python (MISSING when absent)."""
    try:
        value = OmegaConf.select(cfg, dotted, default=MISSING)
    except Exception as err:  # noqa: BLE001 - OmegaConf's errors span several lines
        raise ConfigError(f"{dotted} does not resolve: {str(err).splitlines()[0]}") from None
    if OmegaConf.is_config(value):
        try:
            value = OmegaConf.to_container(value, resolve=True)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"{dotted} does not resolve: {str(err).splitlines()[0]}") from None
    return value
