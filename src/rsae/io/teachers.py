"""Load trained teacher SAEs from other libraries' on-disk formats into rsae SAE classes.

* rsae / SAELens: `cfg.json` + `sae_weights.safetensors` (standard, jumprelu, topk, batchtopk).
* dictionary_learning: `ae.pt` (a state dict, read with `weights_only=True`) + `config.json`
  (`trainer.dict_class` in AutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE).
* sparsify: `cfg.json` + `sae.safetensors` (TopK; `encoder.weight`, `encoder.bias`, `W_dec`, `b_dec`).

Every loader maps onto h = (x - b_dec) W_enc + b_enc with W_enc [d_in, d_sae], so the upgrade
pipeline sees one skeleton whatever trained the teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rsae.io.saelens import WEIGHTS_FILE, build_sae, load_sae
from rsae.sae import SAE, ConfigError


def load_teacher(path: str | Path, d_in: int | None = None) -> SAE:
    """Any supported SAE directory -> rsae SAE in eval mode; `d_in` checks it fits the data."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"teacher SAE directory does not exist: {path}")
    if (path / WEIGHTS_FILE).is_file():
        sae = load_sae(path)
    elif (path / "ae.pt").is_file():
        sae = _load_dictionary_learning(path)
    elif (path / "sae.safetensors").is_file():
        sae = _load_sparsify(path)
    else:
        raise FileNotFoundError(f"{path}: no SAE found (expected {WEIGHTS_FILE}, ae.pt or sae.safetensors)")
    if d_in is not None and sae.d_in != d_in:
        raise ConfigError(f"teacher d_in={sae.d_in} does not match the data's d_in={d_in}")
    return sae.eval()


def _load_dictionary_learning(path: Path) -> SAE:
    state = torch.load(path / "ae.pt", map_location="cpu", weights_only=True)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    trainer = config.get("trainer", {})
    dict_class = trainer.get("dict_class", "AutoEncoder")
    if "encoder.weight" in state:  # AutoEncoder / AutoEncoderTopK / BatchTopKSAE: nn.Linear layout
        b_dec = state["bias"] if "bias" in state else state["b_dec"]
        w_dec = state["decoder.weight"].T  # [d_in, d_sae] -> [d_sae, d_in]
        tensors = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"], "W_dec": w_dec, "b_dec": b_dec}
    else:  # JumpReluAutoEncoder: already W_enc [d_in, d_sae]
        tensors = {k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    cfg: dict = {"apply_b_dec_to_input": True}
    if dict_class == "AutoEncoder":
        cfg["architecture"] = "standard"
    elif dict_class == "JumpReluAutoEncoder":
        cfg["architecture"] = "jumprelu"
        cfg["apply_b_dec_to_input"] = bool(trainer.get("apply_b_dec_to_input", False))
        tensors["threshold"] = state["threshold"]
    elif dict_class == "AutoEncoderTopK":
        cfg.update(architecture="topk", k=int(state["k"]) if "k" in state else int(trainer["k"]))
    elif dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        # Inference of a BatchTopK dictionary is a global threshold on ReLU(h): a JumpReLU.
        thr = state["threshold"].float()
        tensors["threshold"] = thr.expand(tensors["W_enc"].shape[1]).clone() if thr.numel() == 1 else thr
        cfg["architecture"] = "jumprelu"
    else:
        raise ConfigError(f"unsupported dictionary_learning dict_class {dict_class!r}")
    return build_sae(cfg, {k: v.float() for k, v in tensors.items()})


def _load_sparsify(path: Path) -> SAE:
    cfg = json.loads((path / "cfg.json").read_text())
    state = load_file(str(path / "sae.safetensors"))
    tensors = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"], "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if "k" not in cfg:
        raise ConfigError(f"{path / 'cfg.json'}: sparsify config lacks 'k'")
    return build_sae({"architecture": "topk", "k": int(cfg["k"])}, {k: v.float() for k, v in tensors.items()})
