"""Load trained teacher SAEs from other libraries' on-disk formats into rsae SAE classes.

* rsae / SAELens: `cfg.json` + `sae_weights.safetensors` (standard, jumprelu, topk, batchtopk, gated).
* dictionary_learning: `ae.pt` (a state dict, read with `weights_only=True`) + `config.json`
  (`trainer.dict_class` in AutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE).
* sparsify: `cfg.json` + `sae.safetensors` (TopK; `encoder.weight`, `encoder.bias`, `W_dec`, `b_dec`).

Every loader maps onto h = (x - b_dec) W_enc + b_enc with W_enc [d_in, d_sae], so the upgrade
pipeline sees one skeleton whatever trained the teacher. These files come from elsewhere: every
field read is type- and range-checked and every tensor's shape compared with the others (and the
config) before use, and NaN/Inf weights are refused, each as one `SAEFileError` line naming the
file and the field (`rsae.io.checks`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rsae.io.checks import (
    SAEFileError,
    bool_field,
    check_finite,
    check_tensors,
    choice_field,
    describe_tensors,
    int_field,
    load_safetensors,
    matching_int,
    read_json_object,
    safetensors_shapes,
)
from rsae.io.saelens import WEIGHTS_FILE, build_sae, load_sae
from rsae.sae import SAE, ConfigError

DL_CLASSES = ("AutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE")


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
    ae_file, config_file = path / "ae.pt", path / "config.json"
    try:
        state = torch.load(ae_file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors alike: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SAEFileError(f"{ae_file}: cannot be read as a weights-only state dict ({first})") from None
    if not isinstance(state, dict):
        raise SAEFileError(f"{ae_file}: must hold a state dict, got {type(state).__name__}")
    config = read_json_object(config_file) if config_file.is_file() else {}
    trainer = config.get("trainer", {})
    if not isinstance(trainer, dict):
        raise SAEFileError(f"{config_file}: trainer must be a JSON object, got {type(trainer).__name__}")
    where = config_file
    dict_class = choice_field(trainer, "dict_class", where, DL_CLASSES, default="AutoEncoder")
    found = describe_tensors(state)
    linear = "encoder.weight" in state  # AutoEncoder / AutoEncoderTopK / BatchTopKSAE: nn.Linear layout
    enc_name = "encoder.weight" if linear else "W_enc"
    if enc_name not in found or len(found[enc_name][1]) != 2:
        raise SAEFileError(f"{ae_file}: lacks a 2-d encoder tensor 'encoder.weight' (or 'W_enc')")
    d_sae, d_in = found[enc_name][1] if linear else found[enc_name][1][::-1]
    from_enc = f"from {enc_name} {list(found[enc_name][1])}"
    matching_int(trainer, "activation_dim", where, d_in, f"{ae_file.name} ({enc_name} {list(found[enc_name][1])})")
    matching_int(trainer, "dict_size", where, d_sae, f"{ae_file.name} ({enc_name} {list(found[enc_name][1])})")
    if linear:
        b_dec = "bias" if "bias" in state else "b_dec"
        names = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "decoder.weight", "b_dec": b_dec}
        expected = {"encoder.weight": ((d_sae, d_in), f"[d_sae, d_in] {from_enc}"),
                    "encoder.bias": ((d_sae,), f"[d_sae] {from_enc}"),
                    "decoder.weight": ((d_in, d_sae), f"[d_in, d_sae] {from_enc}"),
                    b_dec: ((d_in,), f"[d_in] {from_enc}")}
    else:  # JumpReluAutoEncoder: already W_enc [d_in, d_sae]
        names = {k: k for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        expected = {"W_enc": ((d_in, d_sae), f"[d_in, d_sae] {from_enc}"), "b_enc": ((d_sae,), f"[d_sae] {from_enc}"),
                    "W_dec": ((d_sae, d_in), f"[d_sae, d_in] {from_enc}"), "b_dec": ((d_in,), f"[d_in] {from_enc}")}
    cfg: dict = {"apply_b_dec_to_input": True}
    if dict_class == "JumpReluAutoEncoder":
        expected["threshold"] = ((d_sae,), f"[d_sae] {from_enc}")
        cfg.update(architecture="jumprelu",
                   apply_b_dec_to_input=bool_field(trainer, "apply_b_dec_to_input", where, default=False))
    elif dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        # Inference of a BatchTopK dictionary is a global threshold on ReLU(h): a JumpReLU. The
        # threshold is one number (shape []); a per-latent [d_sae] one is taken as it is.
        shape = found.get("threshold", (None, ()))[1]
        expected["threshold"] = ((() if len(shape) == 0 else (d_sae,)), f"[] or [d_sae] {from_enc}")
        cfg["architecture"] = "jumprelu"
    elif dict_class == "AutoEncoderTopK":
        cfg.update(architecture="topk", k=_topk_k(state, trainer, ae_file, where, d_sae))
    else:
        cfg["architecture"] = "standard"
    check_tensors(ae_file, found, expected)
    check_finite({k: state[k] for k in expected}, ae_file)
    tensors = {ours: state[theirs] for ours, theirs in names.items()}
    if linear:
        tensors["W_enc"], tensors["W_dec"] = tensors["W_enc"].T, tensors["W_dec"].T
    if "threshold" in expected:
        tensors["threshold"] = state["threshold"].float().reshape(-1).expand(d_sae).clone()
    return build_sae(cfg, {k: v.float() for k, v in tensors.items()})


def _topk_k(state: dict, trainer: dict, ae_file: Path, where: Path, d_sae: int) -> int:
    """k of an AutoEncoderTopK: the state's `k` buffer, else the trainer config's."""
    if "k" not in state:
        return int_field(trainer, "k", where, 1, d_sae)
    k = state["k"]
    if not isinstance(k, torch.Tensor) or k.numel() != 1 or k.is_floating_point() or not 1 <= int(k) <= d_sae:
        raise SAEFileError(f"{ae_file}: k must be one integer in [1, {d_sae}], got {k!r}".replace("\n", " "))
    return int(k)


def _load_sparsify(path: Path) -> SAE:
    cfg_file, weights_file = path / "cfg.json", path / "sae.safetensors"
    raw = read_json_object(cfg_file)
    found = safetensors_shapes(weights_file)
    if "encoder.weight" not in found or len(found["encoder.weight"][1]) != 2:
        raise SAEFileError(f"{weights_file}: lacks a 2-d tensor 'encoder.weight'")
    d_sae, d_in = found["encoder.weight"][1]
    source = f"{weights_file.name} (encoder.weight {[d_sae, d_in]})"
    matching_int(raw, "d_in", cfg_file, d_in, source)
    if raw.get("num_latents", 0) != 0:  # 0: derived from expansion_factor
        matching_int(raw, "num_latents", cfg_file, d_sae, source)
    k = int_field(raw, "k", cfg_file, 1, d_sae)
    for flag in ("skip_connection", "transcode"):
        if bool_field(raw, flag, cfg_file, default=False):
            raise SAEFileError(f"{cfg_file}: {flag}=true is not supported")
    why = f"from encoder.weight {[d_sae, d_in]}"
    expected = {"encoder.weight": ((d_sae, d_in), f"[d_sae, d_in] {why}"), "encoder.bias": ((d_sae,), f"[d_sae] {why}"),
                "W_dec": ((d_sae, d_in), f"[d_sae, d_in] {why}"), "b_dec": ((d_in,), f"[d_in] {why}")}
    check_tensors(weights_file, found, expected)
    state = load_safetensors(weights_file, expected)
    check_finite(state, weights_file)
    tensors = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"], "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    return build_sae({"architecture": "topk", "k": k}, {k_: v.float() for k_, v in tensors.items()})
