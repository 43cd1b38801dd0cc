"""Save and load SAEs in SAELens's on-disk layout: `cfg.json` + `sae_weights.safetensors`.

Tensors: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] (those of the
class's `export_skeleton`), plus those its `export_fields` names (`threshold` [d_sae] for
JumpReLU-style exports; b_gate, b_mag, r_mag for the gated SAE, which has no b_enc). Exported
weights act on raw (unnormalised) activations.
Extra `rsae_*` keys in cfg.json are ignored by SAELens and let rsae restore its own classes.
Loading checks `cfg.json` field by field and the tensors' shapes (read from the safetensors
header) against it before loading any tensor, then refuses NaN/Inf weights (`rsae.io.checks`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rsae import jsonfile
from rsae.io.checks import (
    FieldReader,
    SAEFileError,
    bool_field,
    check_finite,
    check_tensors,
    choice_field,
    int_field,
    load_safetensors,
    number_field,
    read_json_object,
    safetensors_shapes,
)
from rsae.sae import ARCHITECTURES, SAE, ConfigError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def save_sae(sae: SAE, path: str | os.PathLike, scale: float = 1.0, metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` (trained on `scale * x`) so that it works on raw activations x."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        **sae.export_config(),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": dict(metadata or {}),
        "rsae_activation_scale": float(scale),
    }
    tensors = sae.export_tensors(scale)
    # Temporary names then rename: a crash never leaves a half-written SAE that looks complete.
    tmp_w, tmp_c = path / (WEIGHTS_FILE + ".tmp"), path / (CFG_FILE + ".tmp")
    save_file(tensors, str(tmp_w))
    tmp_c.write_text(jsonfile.dumps(cfg, indent=2))
    os.replace(tmp_w, path / WEIGHTS_FILE)
    os.replace(tmp_c, path / CFG_FILE)
    return path


def read_sae_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The raw `cfg.json` and the tensors of an SAE directory, both checked (`sae_config`)."""
    path = Path(path)
    cfg, _, tensors = _read_checked(path)
    return cfg, tensors


def _read_checked(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(raw cfg, checked cfg, tensors): fields and tensor shapes are checked against each other
    before any tensor is loaded, and the loaded tensors must be finite."""
    cfg_file, weights_file = path / CFG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{path}: not an SAE directory (needs {CFG_FILE} and {WEIGHTS_FILE})")
    raw = read_json_object(cfg_file)
    found = safetensors_shapes(weights_file)
    cfg, expected = sae_config(raw, cfg_file)
    w_enc = found.get("W_enc", (None, None))[1]
    if w_enc is not None and len(w_enc) == 2 and tuple(w_enc) != (cfg["d_in"], cfg["d_sae"]):
        raise SAEFileError(f"{cfg_file}: d_in={cfg['d_in']}, d_sae={cfg['d_sae']} disagree with the weights "
                           f"({WEIGHTS_FILE}: W_enc [d_in, d_sae] has shape {list(w_enc)})")
    check_tensors(weights_file, found, expected)
    tensors = load_safetensors(weights_file, expected)
    check_finite(tensors, weights_file)
    return raw, cfg, tensors


def sae_config(raw: dict[str, Any], where: Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], str]]]:
    """The fields rsae reads from a SAELens-layout `cfg.json`, each type- and range-checked, and
    the tensors (name -> (shape, why)) they imply. Errors name `where` and the field."""
    name = where.name
    d_in = int_field(raw, "d_in", where, 1)
    d_sae = int_field(raw, "d_sae", where, 1)
    arch = choice_field(raw, "architecture", where, ARCHITECTURES, default="standard")
    arch = choice_field(raw, "rsae_architecture", where, ARCHITECTURES, default=arch)
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "apply_b_dec_to_input": bool_field(raw, "apply_b_dec_to_input", where, default=True),
        "normalize_activations": choice_field(raw, "normalize_activations", where, ("none", None), default="none"),
    }
    if "rsae_activation_scale" in raw:
        number_field(raw, "rsae_activation_scale", where)
    skeleton = {
        "W_enc": ((d_in, d_sae), f"[d_in, d_sae] from {name}"),
        "b_enc": ((d_sae,), f"[d_sae] from {name}"),
        "W_dec": ((d_sae, d_in), f"[d_sae, d_in] from {name}"),
        "b_dec": ((d_in,), f"[d_in] from {name}"),
    }
    cls = ARCHITECTURES[arch]
    expected = {key: skeleton[key] for key in cls.export_skeleton}
    fields, tensors = cls.export_fields(FieldReader(raw, where, d_sae))  # the class's own
    cfg.update(fields)
    expected.update(tensors)
    return cfg, expected


def build_sae(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SAE:
    """An rsae SAE from a SAELens-layout config and tensors (ours or SAELens's own); the callers
    check both first (`sae_config`, `rsae.io.checks`)."""
    arch = cfg.get("rsae_architecture", cfg.get("architecture", "standard"))
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown SAE architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch]
    for key in cls.export_skeleton:
        if key not in tensors:
            raise ConfigError(f"SAE weights lack tensor {key!r}")
    tensors = dict(tensors)
    if not cfg.get("apply_b_dec_to_input", True):  # the same encoder in our form (h from x - b_dec)
        tensors = cls.centre_input(tensors)
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ConfigError(f"SAE expects normalize_activations={cfg['normalize_activations']!r}; only 'none' is supported")
    d_in, d_sae = tensors["W_enc"].shape
    sae = cls(d_in=int(d_in), d_sae=int(d_sae), unit_norm_decoder=False, **cls.kwargs_from_export(cfg))
    sae.load_exported({k: v.float() for k, v in tensors.items()}, cfg)
    return sae.eval()


def load_sae(path: str | os.PathLike) -> SAE:
    """An exported SAE directory -> rsae SAE in eval mode; a malformed or inconsistent `cfg.json`,
    a tensor of the wrong shape, or NaN/Inf weights raise `SAEFileError` (one line)."""
    _, cfg, tensors = _read_checked(Path(path))
    return build_sae(cfg, tensors)
