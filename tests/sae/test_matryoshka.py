"""Matryoshka BatchTopK: nested prefix losses, group sizes, export to SAELens, as an upgrade teacher."""

import json

import pytest
import torch

from conftest import run_train
from rsae.io.saelens import load_sae, save_sae
from rsae.sae import ARCHITECTURES, ConfigError, MatryoshkaSAE, fast
from rsae.sae.matryoshka import resolve_widths


def test_group_sizes_give_cumulative_widths():
    assert resolve_widths([2, 2, 4], 8) == [2, 4, 8]
    assert resolve_widths([0.25, 0.25, 0.5], 8) == [2, 4, 8]
    assert resolve_widths(None, 8) == [8]
    assert ARCHITECTURES["matryoshka"] is MatryoshkaSAE


@pytest.mark.parametrize("sizes,message", [([2, 2], "must sum to d_sae (8)"), ([0.5, 0.6], "must sum to 1"),
                                           ([0, 8], "positive numbers"), ([0.01, 0.99], "empty group")])
def test_bad_group_sizes_are_refused(sizes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MatryoshkaSAE(4, 8, group_sizes=sizes, k=2)


@pytest.mark.parametrize("fast_path", [True, False])
def test_nested_loss_matches_a_hand_computation(fast_path):
    # d_in 2, four latents in groups [1, 1, 2], identity-like decoder, k * B = 2 entries kept.
    sae = MatryoshkaSAE(2, 4, group_sizes=[1, 1, 2], k=1, aux_coefficient=0.0, unit_norm_decoder=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, 0.5]]))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    x = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    # h = [[3, 1, 3, 1], [0, 2, 0, 2]]: the 2 largest of the batch are latents 0 and 2 of row 0 (both 3)
    with fast.disabled() if not fast_path else torch.enable_grad():
        out = sae.training_output(x)
    z = torch.tensor([[3.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(out.z, z)
    # prefix 1 (latent 0): row 0 -> [3, 0], row 1 -> [0, 0]; errors 1 and 4: mean 2.5
    # prefix 2 (latents 0-1): the same codes: 2.5; full: row 0 -> [4.5, 0], errors 1.5^2 + 1 and 4: 3.625
    assert set(out.losses) == {"mse", "mse_1", "mse_2"}
    torch.testing.assert_close(out.losses["mse_1"], torch.tensor(2.5))
    torch.testing.assert_close(out.losses["mse_2"], torch.tensor(2.5))
    torch.testing.assert_close(out.losses["mse"], torch.tensor(3.625))
    torch.testing.assert_close(out.loss, torch.tensor(8.625))


def test_inference_is_batchtopk_threshold_and_export_round_trip(tmp_path):
    torch.manual_seed(0)
    sae = MatryoshkaSAE(16, 64, group_sizes=[8, 24, 32], k=4)
    sae.training_output(torch.randn(64, 16) * 3)
    sae.eval()
    scale = 0.37
    save_sae(sae, tmp_path, scale=scale)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["rsae_architecture"] == "matryoshka"
    assert cfg["matryoshka_widths"] == [8, 32, 64] and cfg["k"] == 4
    ours = load_sae(tmp_path)
    assert type(ours) is MatryoshkaSAE and ours.matryoshka_widths == [8, 32, 64]
    x = torch.randn(40, 16) * 3
    with torch.no_grad():
        z_ref = sae.encode(x * scale)
        torch.testing.assert_close(ours.encode(x), z_ref, rtol=1e-5, atol=1e-5)
        sae_lens = pytest.importorskip("sae_lens")
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
        assert type(theirs).__name__ == "JumpReLUSAE"
        torch.testing.assert_close(theirs.encode(x), z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae.decode(z_ref) / scale, rtol=1e-4, atol=1e-4)


def test_bad_exported_widths_are_refused(tmp_path):
    sae = MatryoshkaSAE(4, 8, group_sizes=[2, 6], k=2)
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "matryoshka_widths": [4, 2, 8]}))
    with pytest.raises(Exception, match="matryoshka_widths must be strictly increasing"):
        load_sae(tmp_path)


def test_train_cli_on_synthetic_data(tmp_path):
    run_train("sae=matryoshka", "sae.k=8", "trainer.max_steps=300", f"hydra.run.dir={tmp_path}", "data=synthetic",
              "logger=csv", "data.batch_size=256", "trainer.val_check_interval=100")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["val/fvu"] < 0.5, metrics
    assert 0 < metrics["val/l0"] < 32
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["rsae_architecture"] == "matryoshka" and cfg["matryoshka_widths"][-1] == cfg["d_sae"]
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/mse_" in header  # the inner prefixes' losses are logged
