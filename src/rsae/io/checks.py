"""Checks for SAE files written elsewhere: every field the loaders read is typed and bounded,
every tensor's shape is read from the file's header and compared with the config before anything
is loaded, and weights must be finite. Each failure is one line naming the file and the field."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open

from rsae.errors import ConfigError

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_TORCH_FLOATS = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
_REQUIRED = object()


class SAEFileError(ConfigError):
    """An SAE file that is malformed, disagrees with its config, or holds non-finite weights."""


class NonFiniteWeightsError(SAEFileError):
    """An SAE tensor holds NaN or Inf values."""


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, bool, type(None), list, dict, int, float)) else repr(value)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; unreadable or malformed -> one line naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise SAEFileError(f"{path}: not valid JSON ({err})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SAEFileError(f"{path}: cannot be read ({err})") from None
    if not isinstance(data, dict):
        raise SAEFileError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


# --- fields -----------------------------------------------------------------------------------
def _missing(key: str, default: Any, where: Path) -> Any:
    if default is _REQUIRED:
        raise SAEFileError(f"{where}: lacks the field {key!r}")
    return default


def int_field(cfg: dict, key: str, where: Path, lo: int, hi: int | None = None, default: Any = _REQUIRED) -> Any:
    """A JSON integer (not a bool, not 2.0) in [lo, hi]."""
    if key not in cfg:
        return _missing(key, default, where)
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise SAEFileError(f"{where}: {key} must be an integer {allowed}, got {_show(value)}")
    return value


def matching_int(cfg: dict, key: str, where: Path, actual: int, source: str) -> int:
    """An optional integer field that must equal what the tensors say (`source` names them)."""
    if key in cfg and (isinstance(cfg[key], bool) or cfg[key] != actual or not isinstance(cfg[key], int)):
        raise SAEFileError(f"{where}: {key} is {_show(cfg[key])} but {source} gives {actual}")
    return actual


def bool_field(cfg: dict, key: str, where: Path, default: Any = _REQUIRED) -> Any:
    if key not in cfg:
        return _missing(key, default, where)
    value = cfg[key]
    if not isinstance(value, bool):
        raise SAEFileError(f"{where}: {key} must be true or false, got {_show(value)}")
    return value


def number_field(cfg: dict, key: str, where: Path, default: Any = _REQUIRED) -> Any:
    """A finite number > 0."""
    if key not in cfg:
        return _missing(key, default, where)
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SAEFileError(f"{where}: {key} must be a finite number > 0, got {_show(value)}")
    return float(value)


def choice_field(cfg: dict, key: str, where: Path, choices: Iterable, default: Any = _REQUIRED) -> Any:
    if key not in cfg:
        return _missing(key, default, where)
    value, choices = cfg[key], tuple(choices)
    if not isinstance(value, (str, type(None))) or value not in choices:
        raise SAEFileError(f"{where}: {key} must be one of {', '.join(_show(c) for c in choices)}, got {_show(value)}")
    return value


def degrees_field(cfg: dict, where: Path, max_degree: int = 32) -> tuple[int, int]:
    """Rational degrees (p, q): two small integers (they size the coefficient tensors)."""
    value = cfg["degrees"] if "degrees" in cfg else _missing("degrees", _REQUIRED, where)
    if (not isinstance(value, list) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= max_degree for v in value)):
        raise SAEFileError(f"{where}: degrees must be two integers in [0, {max_degree}], got {_show(value)}")
    return int(value[0]), int(value[1])


class FieldReader:
    """Typed, range-checked reads of one `cfg.json` whose errors name the file and the field
    (`SAEFileError`). `rsae.io.saelens.sae_config` hands one to the architecture's
    `SAE.export_fields`, which reads its own fields with it and names the tensors they imply."""

    def __init__(self, raw: dict, where: Path, d_sae: int) -> None:
        self.raw, self.where, self.name, self.d_sae = raw, where, where.name, d_sae

    def int(self, key: str, lo: int, hi: int | None = None, default: Any = _REQUIRED) -> Any:
        return int_field(self.raw, key, self.where, lo, hi, default)

    def bool(self, key: str, default: Any = _REQUIRED) -> Any:
        return bool_field(self.raw, key, self.where, default)

    def number(self, key: str, default: Any = _REQUIRED) -> Any:
        return number_field(self.raw, key, self.where, default)

    def choice(self, key: str, choices: Iterable, default: Any = _REQUIRED) -> Any:
        return choice_field(self.raw, key, self.where, choices, default)

    def degrees(self) -> tuple[int, int]:
        return degrees_field(self.raw, self.where)

    def widths(self, key: str) -> list[int]:
        """Strictly increasing positive integers ending at d_sae (default: [d_sae])."""
        widths = self.raw.get(key, [self.d_sae])
        ok = (isinstance(widths, list) and widths and all(isinstance(w, int) and not isinstance(w, bool) for w in widths)
              and widths[0] >= 1 and widths[-1] == self.d_sae and all(a < b for a, b in zip(widths, widths[1:])))
        if not ok:
            self.refuse(f"{key} must be strictly increasing integers ending at d_sae={self.d_sae}, got {widths!r}")
        return widths

    def per_latent(self) -> tuple[tuple[int, ...], str]:
        """The expected shape of a per-latent tensor ([d_sae]) and why."""
        return (self.d_sae,), f"[d_sae] from {self.name}"

    def refuse(self, message: str) -> None:
        raise SAEFileError(f"{self.where}: {message}")


# --- tensors ----------------------------------------------------------------------------------
def safetensors_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors header, without loading any tensor."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
                    for name in handle.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SAEFileError(f"{path}: not a readable safetensors file ({reason})") from None


def load_safetensors(path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Only the named tensors (shapes already checked against the config)."""
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in names}


def check_tensors(path: Path, found: dict[str, tuple[str, tuple[int, ...]]],
                  expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Every expected tensor present, floating point, with its shape. `expected` maps a name to
    (shape, how the shape is derived, e.g. "[d_sae] from cfg.json")."""
    for name, (shape, why) in expected.items():
        if name not in found:
            raise SAEFileError(f"{path}: lacks tensor {name!r} (expected shape {list(shape)}, {why})")
        dtype, got = found[name]
        if dtype not in FLOAT_DTYPES:
            raise SAEFileError(f"{path}: tensor {name!r} has dtype {dtype}; expected a float type ({', '.join(FLOAT_DTYPES)})")
        if tuple(got) != tuple(shape):
            raise SAEFileError(f"{path}: tensor {name!r} has shape {list(got)}, expected {list(shape)} ({why})")


def describe_tensors(tensors: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`safetensors_shapes`'s form for tensors already in memory (a state dict)."""
    return {name: (_TORCH_FLOATS.get(t.dtype, str(t.dtype).removeprefix("torch.")), tuple(t.shape))
            for name, t in tensors.items() if isinstance(t, torch.Tensor)}


def check_finite(tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse NaN/Inf weights, naming the file and the tensor."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise NonFiniteWeightsError(f"{where}: tensor {name!r} has {bad} NaN/Inf values of {tensor.numel()}; "
                                            "refusing to load it")


def check_sae_finite(sae: torch.nn.Module, where: str | Path) -> None:
    """The same refusal for an SAE already built (its parameters and buffers)."""
    check_finite(dict(sae.state_dict()), where)
