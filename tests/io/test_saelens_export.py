import json

import pytest
import torch

from rsae.io.saelens import build_sae, load_sae, save_sae
from rsae.sae import BatchTopKSAE, ConfigError, GatedSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, TopKSAE

CASES = [(ReLUSAE, {}, "standard"), (JumpReLUSAE, {}, "jumprelu"), (TopKSAE, {"k": 5}, "topk"), (BatchTopKSAE, {"k": 5}, "jumprelu"),
         (MatryoshkaSAE, {"k": 5, "group_sizes": [8, 24, 32]}, "jumprelu"), (GatedSAE, {}, "gated")]


def _trained_like(cls, kw, scale):
    torch.manual_seed(0)
    sae = cls(16, 64, **kw)
    with torch.no_grad():
        for name in ("b_enc", "b_gate", "b_mag", "r_mag"):  # the per-latent encoder tensors it has
            if hasattr(sae, name):
                getattr(sae, name).normal_(0, 0.5)
        sae.b_dec.normal_()
    sae.train()
    sae.training_output(torch.randn(32, 16) * 3 * scale)  # sets BatchTopK's threshold
    return sae.eval()


@pytest.mark.parametrize("cls,kw,arch", CASES)
def test_saelens_loads_our_export_and_reproduces_encoder(tmp_path, cls, kw, arch):
    sae_lens = pytest.importorskip("sae_lens")
    scale = 0.37
    sae = _trained_like(cls, kw, scale)
    save_sae(sae, tmp_path, scale=scale)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["d_in"] == 16 and cfg["d_sae"] == 64
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(40, 16) * 3  # raw activations
    with torch.no_grad():
        z_ref = sae.encode(x * scale)
        xhat_ref = sae.decode(z_ref) / scale
        torch.testing.assert_close(theirs.encode(x), z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), xhat_ref, rtol=1e-4, atol=1e-4)
        ours = load_sae(tmp_path)
        assert type(ours) is cls
        torch.testing.assert_close(ours.encode(x), z_ref, rtol=1e-5, atol=1e-5)


def test_saelens_written_sae_loads_into_rsae(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens import StandardSAE, StandardSAEConfig

    theirs = StandardSAE(StandardSAEConfig(d_in=8, d_sae=24, apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    theirs.save_model(str(tmp_path))
    ours = load_sae(tmp_path)
    x = torch.randn(10, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-4, atol=1e-4)


def test_unknown_architecture_and_missing_dir(tmp_path):
    with pytest.raises(ConfigError, match="unknown SAE architecture"):
        build_sae({"architecture": "no_such_architecture"}, {})
    with pytest.raises(FileNotFoundError, match="not an SAE directory"):
        load_sae(tmp_path / "nothing")
