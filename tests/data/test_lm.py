"""Loading LMs from local directories and GGUF paths, offline."""

import os

import pytest
import torch

from rsae.data.lm import check_lm_source, expand_path, load_lm, lm_identity, split_gguf, torch_dtype
from rsae.data.tiny import make_tiny_lm


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny", "llama")


def test_load_local_directory_offline(lm_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_lm(str(lm_dir), dtype="bfloat16")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.bos_token_id is not None


def test_missing_local_files_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_lm(str(tmp_path / "nope" / "model"))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_lm(str(tmp_path), gguf_file="model.gguf")
    with pytest.raises(ValueError, match="unknown dtype"):
        torch_dtype("float8")


def test_gguf_naming_forms(tmp_path):
    assert split_gguf(str(tmp_path / "m.gguf"), None) == (str(tmp_path), "m.gguf")
    assert split_gguf(str(tmp_path), "m.gguf") == (str(tmp_path), "m.gguf")
    assert split_gguf("ignored", str(tmp_path / "m.gguf")) == (str(tmp_path), "m.gguf")


def test_pkg_paths_expand_without_importing(monkeypatch):
    import sys

    assert expand_path("pkg://pytest") == os.path.dirname(pytest.__file__)
    assert expand_path("pkg://pytest/x.gguf") == os.path.join(os.path.dirname(pytest.__file__), "x.gguf")
    with pytest.raises(FileNotFoundError, match="not installed"):
        expand_path("pkg://no_such_package_xyz")
    assert "no_such_package_xyz" not in sys.modules


def test_identity_is_a_content_hash_for_local_models(lm_dir, tmp_path):
    first = lm_identity(str(lm_dir))
    assert first["source"] == "local" and first == lm_identity(str(lm_dir))
    other = make_tiny_lm(tmp_path / "other", "llama", seed=1)
    assert lm_identity(str(other)) != first
    assert lm_identity("EleutherAI/pythia-70m", revision="step1000") == {
        "source": "hub", "name": "EleutherAI/pythia-70m", "revision": "step1000"}
    assert check_lm_source("gpt2") == ("gpt2", None)
