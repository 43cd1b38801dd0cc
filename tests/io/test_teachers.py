"""Teachers from other libraries' formats: the loaded encoder matches each library's own formula."""

import json

import pytest
import torch
from safetensors.torch import save_file

from rsae.io.saelens import save_sae
from rsae.io.teachers import load_teacher
from rsae.sae import ConfigError, TopKSAE

D, M = 8, 24


def _rand(*shape):
    return torch.randn(*shape)


def test_dictionary_learning_autoencoder(tmp_path):
    state = {"encoder.weight": _rand(M, D), "encoder.bias": _rand(M), "decoder.weight": _rand(D, M), "bias": _rand(D)}
    torch.save(state, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    sae = load_teacher(tmp_path)
    x = _rand(5, D)
    f = torch.relu((x - state["bias"]) @ state["encoder.weight"].T + state["encoder.bias"])  # their encode
    x_hat = f @ state["decoder.weight"].T + state["bias"]
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), x_hat, rtol=1e-4, atol=1e-4)


def test_dictionary_learning_jumprelu_without_b_dec_in_encoder(tmp_path):
    state = {"W_enc": _rand(D, M), "b_enc": _rand(M), "W_dec": _rand(M, D), "b_dec": _rand(D), "threshold": torch.rand(M)}
    torch.save(state, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "JumpReluAutoEncoder"}}))
    sae = load_teacher(tmp_path)
    x = _rand(5, D)
    pre = x @ state["W_enc"] + state["b_enc"]
    f = torch.relu(pre) * (pre > state["threshold"])
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)


def test_dictionary_learning_topk_and_batchtopk(tmp_path):
    state = {"encoder.weight": _rand(M, D), "encoder.bias": _rand(M), "decoder.weight": _rand(D, M), "b_dec": _rand(D),
             "k": torch.tensor(4), "threshold": torch.tensor(0.3)}
    torch.save(state, tmp_path / "ae.pt")
    x = _rand(6, D)
    post = torch.relu((x - state["b_dec"]) @ state["encoder.weight"].T + state["encoder.bias"])
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK"}}))
    topk = load_teacher(tmp_path)
    assert isinstance(topk, TopKSAE) and topk.k == 4
    vals, idx = post.topk(4, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(topk.encode(x), torch.zeros_like(post).scatter(-1, idx, vals), rtol=1e-5, atol=1e-5)
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE"}}))
    btk = load_teacher(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(btk.encode(x), post * (post > 0.3), rtol=1e-5, atol=1e-5)


def test_sparsify_topk(tmp_path):
    state = {"encoder.weight": _rand(M, D), "encoder.bias": _rand(M), "W_dec": _rand(M, D), "b_dec": _rand(D)}
    save_file(state, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"k": 3, "num_latents": M, "d_in": D}))
    sae = load_teacher(tmp_path)
    x = _rand(5, D)
    pre = torch.relu((x - state["b_dec"]) @ state["encoder.weight"].T + state["encoder.bias"])
    vals, idx = pre.topk(3, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), torch.zeros_like(pre).scatter(-1, idx, vals), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), sae.encode(x) @ state["W_dec"] + state["b_dec"], rtol=1e-4, atol=1e-4)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no SAE found"):
        load_teacher(tmp_path)
    save_sae(TopKSAE(D, M, k=2), tmp_path / "ours")
    with pytest.raises(ConfigError, match="does not match the data's d_in=16"):
        load_teacher(tmp_path / "ours", d_in=16)
    assert load_teacher(tmp_path / "ours", d_in=D).k == 2
