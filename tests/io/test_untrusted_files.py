"""SAE files from outside: each malformed field or tensor is refused in one line naming the file
and the field, before anything is built from it."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from rsae.io.checks import NonFiniteWeightsError, SAEFileError, check_sae_finite
from rsae.io.saelens import load_sae, read_sae_dir, save_sae
from rsae.io.teachers import load_teacher
from rsae.sae import ConfigError, JumpReLUSAE, RationalSAE, ReLUSAE, TopKSAE

D, M = 8, 24


def _refused(path, pattern, loader=load_sae, error=SAEFileError):
    """The loader raises `error` (a ConfigError) whose single line matches `pattern`."""
    with pytest.raises(error) as info:
        loader(path)
    message = str(info.value)
    assert isinstance(info.value, ConfigError) and "\n" not in message
    assert re.search(pattern, message), message
    return message


def _edit_cfg(path, **changes):
    cfg = json.loads((path / "cfg.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key)
        else:
            cfg[key] = value
    (path / "cfg.json").write_text(json.dumps(cfg))


def _edit_weights(path, **changes):
    tensors = load_file(str(path / "sae_weights.safetensors"))
    for key, value in changes.items():
        if value is _DROP:
            tensors.pop(key)
        else:
            tensors[key] = value
    save_file(tensors, str(path / "sae_weights.safetensors"))


_DROP = object()


@pytest.fixture
def jumprelu_dir(tmp_path):
    return save_sae(JumpReLUSAE(D, M), tmp_path / "jumprelu")


@pytest.fixture
def rational_dir(tmp_path):
    return save_sae(RationalSAE(D, M, sharing="group", n_groups=4), tmp_path / "rational")


# --- SAELens layout (ours and SAELens's) ------------------------------------------------------
def test_huge_rational_degrees_are_refused_before_allocating(rational_dir):
    _edit_cfg(rational_dir, degrees=[20_000_000, 1])
    _refused(rational_dir, rf"^{re.escape(str(rational_dir / 'cfg.json'))}: degrees must be two integers in \[0, 32\], got \[20000000, 1\]$")
    for bad in ([5], [5, 4.0], [-1, 2], "5,4", [True, 2]):
        _edit_cfg(rational_dir, degrees=bad)
        _refused(rational_dir, r"cfg.json: degrees must be two integers")


def test_rational_fields_and_coefficient_shapes(rational_dir):
    assert load_sae(rational_dir).rational_gate.n_groups == 4  # the fixture is valid
    _edit_cfg(rational_dir, n_groups=3)
    _refused(rational_dir, r"sae_weights.safetensors: tensor 'rational_a' has shape \[4, 6\], expected \[3, 6\] .*n_groups=3")
    _edit_cfg(rational_dir, n_groups=1000)
    _refused(rational_dir, r"cfg.json: n_groups must be an integer in \[1, 24\], got 1000")
    _edit_cfg(rational_dir, n_groups=4, gate="sigmoid")
    _refused(rational_dir, r"cfg.json: gate must be one of .*got \"sigmoid\"")
    _edit_cfg(rational_dir, gate="relu", t_max="8")
    _refused(rational_dir, r"cfg.json: t_max must be a finite number > 0")
    _edit_cfg(rational_dir, t_max=8.0, gate="jumprelu")
    _refused(rational_dir, r"lacks tensor 'threshold'")


def test_missing_or_misshapen_threshold(jumprelu_dir):
    _edit_weights(jumprelu_dir, threshold=torch.ones(1))
    _refused(jumprelu_dir, r"sae_weights.safetensors: tensor 'threshold' has shape \[1\], expected \[24\]")
    _edit_weights(jumprelu_dir, threshold=_DROP)
    _refused(jumprelu_dir, r"sae_weights.safetensors: lacks tensor 'threshold'")


def test_missing_core_tensor_and_wrong_dtype(jumprelu_dir):
    _edit_weights(jumprelu_dir, b_dec=torch.zeros(D, dtype=torch.int64))
    _refused(jumprelu_dir, r"tensor 'b_dec' has dtype I64")
    _edit_weights(jumprelu_dir, b_dec=_DROP)
    _refused(jumprelu_dir, r"sae_weights.safetensors: lacks tensor 'b_dec'")


def test_boolean_fields_must_be_booleans(jumprelu_dir):
    _edit_cfg(jumprelu_dir, apply_b_dec_to_input="false")
    _refused(jumprelu_dir, r"cfg.json: apply_b_dec_to_input must be true or false, got \"false\"")


def test_config_sizes_must_match_the_tensors(jumprelu_dir):
    _edit_cfg(jumprelu_dir, d_in=16)
    _refused(jumprelu_dir, r"cfg.json: d_in=16, d_sae=24 disagree with the weights .*W_enc.*\[8, 24\]")
    _edit_cfg(jumprelu_dir, d_in=D, d_sae=12)
    _refused(jumprelu_dir, r"cfg.json: d_in=8, d_sae=12 disagree")
    _edit_cfg(jumprelu_dir, d_sae="24")
    _refused(jumprelu_dir, r"cfg.json: d_sae must be an integer >= 1, got \"24\"")
    _edit_cfg(jumprelu_dir, d_sae=_DROP)
    _refused(jumprelu_dir, r"cfg.json: lacks the field 'd_sae'")


def test_topk_k_is_checked(tmp_path):
    path = save_sae(TopKSAE(D, M, k=3), tmp_path)
    for bad, shown in (("3", r"\"3\""), (0, "0"), (M + 1, str(M + 1)), (2.5, "2.5")):
        _edit_cfg(path, k=bad)
        _refused(path, rf"cfg.json: k must be an integer in \[1, 24\], got {shown}")
    _edit_cfg(path, k=3, rescale_acts_by_decoder_norm=True)
    _refused(path, r"rescale_acts_by_decoder_norm=true is not supported")


def test_malformed_files(jumprelu_dir):
    (jumprelu_dir / "cfg.json").write_text("{not json")
    _refused(jumprelu_dir, r"cfg.json: not valid JSON")
    (jumprelu_dir / "cfg.json").write_text("[1, 2]")
    _refused(jumprelu_dir, r"cfg.json: must hold a JSON object, got list")
    (jumprelu_dir / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": M, "architecture": "jumprelu"}))
    (jumprelu_dir / "sae_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    _refused(jumprelu_dir, r"sae_weights.safetensors: not a readable safetensors file", loader=read_sae_dir)


def test_unsupported_architecture_and_normalisation(jumprelu_dir):
    _edit_cfg(jumprelu_dir, architecture="no_such_architecture")
    _refused(jumprelu_dir, r"cfg.json: architecture must be one of .*got \"no_such_architecture\"")
    _edit_cfg(jumprelu_dir, architecture="jumprelu", normalize_activations="layer_norm")
    _refused(jumprelu_dir, r"cfg.json: normalize_activations must be one of \"none\", null")


def test_non_finite_weights_are_refused_naming_the_tensor(jumprelu_dir):
    w_dec = load_file(str(jumprelu_dir / "sae_weights.safetensors"))["W_dec"]
    w_dec[3, 1] = float("nan")
    w_dec[0, 0] = float("inf")
    _edit_weights(jumprelu_dir, W_dec=w_dec)
    _refused(jumprelu_dir, r"sae_weights.safetensors: tensor 'W_dec' has 2 NaN/Inf values", error=NonFiniteWeightsError)
    _refused(jumprelu_dir, r"tensor 'W_dec'", loader=load_teacher, error=NonFiniteWeightsError)


def test_check_sae_finite_for_models_built_otherwise():
    sae = ReLUSAE(D, M)
    check_sae_finite(sae, "model.ckpt")
    with torch.no_grad():
        sae.b_enc[2] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"^model.ckpt: tensor 'b_enc' has 1 NaN/Inf"):
        check_sae_finite(sae, "model.ckpt")


# --- dictionary_learning ----------------------------------------------------------------------
class NotATensor:
    pass


def _dl(path, state, config):
    path.mkdir(exist_ok=True)
    torch.save(state, path / "ae.pt")
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def _dl_state():
    return {"encoder.weight": torch.randn(M, D), "encoder.bias": torch.randn(M), "decoder.weight": torch.randn(D, M),
            "bias": torch.randn(D)}


def test_dictionary_learning_missing_tensors(tmp_path):
    state = _dl_state()
    del state["decoder.weight"]
    _refused(_dl(tmp_path / "a", state, {"trainer": {"dict_class": "AutoEncoder"}}),
             r"ae.pt: lacks tensor 'decoder.weight' \(expected shape \[8, 24\]", loader=load_teacher)
    jump = {"W_enc": torch.randn(D, M), "b_enc": torch.randn(M), "W_dec": torch.randn(M, D), "b_dec": torch.randn(D)}
    _refused(_dl(tmp_path / "b", jump, {"trainer": {"dict_class": "JumpReluAutoEncoder"}}),
             r"ae.pt: lacks tensor 'threshold'", loader=load_teacher)
    _refused(_dl(tmp_path / "c", {**jump, "threshold": torch.ones(1)}, {"trainer": {"dict_class": "JumpReluAutoEncoder"}}),
             r"ae.pt: tensor 'threshold' has shape \[1\], expected \[24\]", loader=load_teacher)


def test_dictionary_learning_config_problems(tmp_path):
    path = _dl(tmp_path / "a", _dl_state(), "{'trainer': 1")
    _refused(path, rf"^{re.escape(str(path / 'config.json'))}: not valid JSON", loader=load_teacher)
    _dl(path, _dl_state(), {"trainer": {"dict_class": "AutoEncoder", "activation_dim": 16}})
    _refused(path, r"config.json: activation_dim is 16 but ae.pt \(encoder.weight \[24, 8\]\) gives 8", loader=load_teacher)
    _dl(path, _dl_state(), {"trainer": {"dict_class": "GatedAutoEncoder"}})
    _refused(path, r"config.json: dict_class must be one of", loader=load_teacher)
    _dl(path, _dl_state(), {"trainer": "AutoEncoder"})
    _refused(path, r"config.json: trainer must be a JSON object", loader=load_teacher)
    jump = {"W_enc": torch.randn(D, M), "b_enc": torch.randn(M), "W_dec": torch.randn(M, D), "b_dec": torch.randn(D),
            "threshold": torch.rand(M)}
    _dl(path, jump, {"trainer": {"dict_class": "JumpReluAutoEncoder", "apply_b_dec_to_input": "false"}})
    _refused(path, r"config.json: apply_b_dec_to_input must be true or false", loader=load_teacher)
    topk = {**_dl_state(), "k": torch.tensor(0)}
    _dl(path, topk, {"trainer": {"dict_class": "AutoEncoderTopK"}})
    _refused(path, r"ae.pt: k must be one integer in \[1, 24\]", loader=load_teacher)


def test_dictionary_learning_unsafe_pickle_and_nan(tmp_path):
    path = _dl(tmp_path / "a", {"encoder.weight": NotATensor()}, None)
    _refused(path, r"ae.pt: cannot be read as a weights-only state dict", loader=load_teacher)
    state = _dl_state()
    state["encoder.bias"][0] = float("nan")
    _refused(_dl(tmp_path / "b", state, None), r"ae.pt: tensor 'encoder.bias' has 1 NaN/Inf", loader=load_teacher,
             error=NonFiniteWeightsError)


# --- sparsify -----------------------------------------------------------------------------------
def _sparsify(path, cfg, **changes):
    path.mkdir(exist_ok=True)
    state = {"encoder.weight": torch.randn(M, D), "encoder.bias": torch.randn(M), "W_dec": torch.randn(M, D),
             "b_dec": torch.randn(D), **changes}
    save_file(state, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def test_sparsify_problems(tmp_path):
    path = tmp_path / "s"
    _refused(_sparsify(path, {"num_latents": M}), r"cfg.json: lacks the field 'k'", loader=load_teacher)
    _refused(_sparsify(path, {"k": "4"}), r"cfg.json: k must be an integer in \[1, 24\]", loader=load_teacher)
    _refused(_sparsify(path, {"k": 4, "d_in": 16}), r"cfg.json: d_in is 16 but sae.safetensors", loader=load_teacher)
    _refused(_sparsify(path, {"k": 4, "num_latents": 48}), r"cfg.json: num_latents is 48", loader=load_teacher)
    _refused(_sparsify(path, {"k": 4, "skip_connection": True}), r"skip_connection=true is not supported", loader=load_teacher)
    _refused(_sparsify(path, {"k": 4}, b_dec=torch.randn(D + 1)),
             r"sae.safetensors: tensor 'b_dec' has shape \[9\], expected \[8\]", loader=load_teacher)
    _refused(_sparsify(path, {"k": 4}, b_dec=torch.full((D,), float("inf"))), r"sae.safetensors: tensor 'b_dec' has 8 NaN/Inf",
             loader=load_teacher, error=NonFiniteWeightsError)
    assert load_teacher(_sparsify(path, {"k": 4, "num_latents": 0, "d_in": D})).k == 4
