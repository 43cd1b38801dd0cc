"""Save and load SAEs in SAELens's on-disk layout: `cfg.json` + `sae_weights.safetensors`.

Tensors: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus `threshold`
[d_sae] for JumpReLU-style exports. Exported weights act on raw (unnormalised) activations.
Extra `rsae_*` keys in cfg.json are ignored by SAELens and let rsae restore its own classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rsae import jsonfile
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
    path = Path(path)
    cfg_file, weights_file = path / CFG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{path}: not an SAE directory (needs {CFG_FILE} and {WEIGHTS_FILE})")
    cfg = json.loads(cfg_file.read_text())
    tensors = load_file(str(weights_file))
    return cfg, tensors


def build_sae(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SAE:
    """An rsae SAE from a SAELens-layout config and tensors (ours or SAELens's own)."""
    arch = cfg.get("rsae_architecture", cfg.get("architecture", "standard"))
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown SAE architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if key not in tensors:
            raise ConfigError(f"SAE weights lack tensor {key!r}")
    tensors = dict(tensors)
    if not cfg.get("apply_b_dec_to_input", True):
        # h = x W_enc + b_enc  ==  (x - b_dec) W_enc + (b_enc + b_dec W_enc): same encoder, our form.
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ConfigError(f"SAE expects normalize_activations={cfg['normalize_activations']!r}; only 'none' is supported")
    d_in, d_sae = tensors["W_enc"].shape
    cls = ARCHITECTURES[arch]
    sae = cls(d_in=int(d_in), d_sae=int(d_sae), unit_norm_decoder=False, **cls.kwargs_from_export(cfg))
    sae.load_exported({k: v.float() for k, v in tensors.items()}, cfg)
    return sae.eval()


def load_sae(path: str | os.PathLike) -> SAE:
    cfg, tensors = read_sae_dir(path)
    return build_sae(cfg, tensors)
