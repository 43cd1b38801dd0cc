"""Gated SAE: the maths on a hand-made example, which loss trains which path, its L1 lever, the
SAELens export both ways, its JumpReLU form as an upgrade teacher, and a tiny train.py run."""

import json
import math

import pytest
import torch

from conftest import run_train
from rsae.io.saelens import load_sae, save_sae
from rsae.sae import ARCHITECTURES, ConfigError, GatedSAE, RationalSAE, fast

SQRT2 = math.sqrt(2.0)


def _hand_made(l1=2.0, aux=1.0):
    """d_in 2, three latents, float64. For x = [3, 2]: u = W_enc^T (x - b_dec) = [2, 2, 0],
    pi_gate = u + b_gate = [1, -1, 0.5] (gate [1, 0, 1]), pi_mag = exp(r_mag) u + b_mag = [3, 2, -1],
    z = [3, 0, 0]: latent 1's magnitude is positive but its gate shut, latent 2's gate open but its
    magnitude negative. For x = [1, 0] = b_dec: u = 0, pi_gate = b_gate, pi_mag = b_mag, z = 0."""
    sae = GatedSAE(2, 3, l1_coefficient=l1, aux_coefficient=aux, unit_norm_decoder=False).double()
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
        sae.b_gate.copy_(torch.tensor([-1.0, -3.0, 0.5]))
        sae.r_mag.copy_(torch.tensor([math.log(2.0), 0.0, 0.0]))
        sae.b_mag.copy_(torch.tensor([-1.0, 0.0, -1.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))  # row norms 1, 2, sqrt 2
    return sae, torch.tensor([[3.0, 2.0], [1.0, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("fast_path", [True, False])
def test_codes_and_losses_match_a_hand_computation(fast_path):
    sae, x = _hand_made()
    with fast.disabled() if not fast_path else torch.enable_grad():
        out = sae.training_output(x)
    torch.testing.assert_close(out.h, torch.tensor([[3.0, 2.0, -1.0], [-1.0, 0.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(out.z, torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(out.x_hat, torch.tensor([[4.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    # mse: row 0 (3-4)^2 + 2^2 = 5, row 1 0; mean 2.5.
    # L1 on relu(pi_gate) = [1, 0, 0.5] and [0, 0, 0.5], weighted by the row norms: 1 + 0.5 sqrt2 and
    # 0.5 sqrt2; times 2, mean: 1 + sqrt2.
    # aux: via the gate, row 0 [1, 0] + 0.5 [1, 1] + b_dec = [2.5, 0.5], error 0.25 + 2.25 = 2.5;
    # row 1 0.5 [1, 1] + b_dec = [1.5, 0.5], error 0.5; mean 1.5.
    assert set(out.losses) == {"mse", "l1", "aux_recon"}
    for name, value in {"mse": 2.5, "l1": 1 + SQRT2, "aux_recon": 1.5}.items():  # (the L1 sums in float32)
        assert float(out.losses[name].detach()) == pytest.approx(value, rel=1e-12 if name != "l1" else 1e-6), name
    # the same codes from the paper's two paths written out
    u = (x - sae.b_dec) @ sae.W_enc
    paper = ((u + sae.b_gate) > 0) * torch.relu(sae.r_mag.exp() * u + sae.b_mag)
    torch.testing.assert_close(sae.encode(x), paper.detach())
    # its JumpReLU form: theta = b_mag - exp(r_mag) b_gate = [1, 3, -1.5]; the upgrade keeps max(theta, 0)
    torch.testing.assert_close(sae.gate_threshold(), torch.tensor([1.0, 3.0, -1.5], dtype=torch.float64))
    torch.testing.assert_close(sae.upgrade_threshold(), torch.tensor([1.0, 3.0, 0.0]))


def _grads(sae, x, term):
    sae.zero_grad(set_to_none=False)
    sae.training_output(x).losses[term].backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def test_each_loss_trains_its_own_path():
    sae, x = _hand_made()
    for p in sae.parameters():
        p.grad = torch.zeros_like(p)
    # reconstruction: the step passes no gradient, so the gate's bias learns nothing from it
    g = _grads(sae, x, "mse")
    assert torch.all(g["b_gate"] == 0) and g["b_mag"].abs().sum() > 0 and g["r_mag"].abs().sum() > 0
    # L1 on relu(pi_gate): the gate path only; d/db_gate = 2 ||W_dec_j|| mean_rows [pi_gate_j > 0]
    g = _grads(sae, x, "l1")
    torch.testing.assert_close(g["b_gate"], torch.tensor([1.0, 0.0, 2 * SQRT2], dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.all(g["b_mag"] == 0) and torch.all(g["r_mag"] == 0)
    # auxiliary reconstruction: trains the gate path through a frozen decoder
    g = _grads(sae, x, "aux_recon")
    assert g["b_gate"].abs().sum() > 0 and g["W_enc"].abs().sum() > 0
    assert torch.all(g["W_dec"] == 0) and torch.all(g["b_mag"] == 0) and torch.all(g["r_mag"] == 0)
    # d aux / d b_gate_j = 2 mean_rows [pi_gate_j > 0] (via - x) . W_dec_j; latent 0 is open in row 0
    # only, where via - x = [2.5, 0.5] - [3, 2] = [-0.5, -1.5]: 2 * (-0.5 * 1 + -1.5 * 0) / 2 = -0.5
    assert float(g["b_gate"][0]) == pytest.approx(-0.5, rel=1e-12)
    assert sae.sparsity_lever() == "l1_coefficient"


def test_l0_follows_the_l1_coefficient():
    """The lever HoldL0 and the upgrade's control move: a larger L1 gives a sparser SAE."""
    from rsae.data.synthetic import SyntheticFeatures

    src = SyntheticFeatures(16, 64, 6.0, 0.5, 0.5, 1.5, 0.0, seed=1)
    l0s = []
    for coef in (0.5, 5.0):
        torch.manual_seed(0)
        sae = GatedSAE(16, 64, l1_coefficient=coef)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        for i in range(150):
            opt.zero_grad()
            sae.training_output(src.batch(i, 256) * 2, step=i).loss.backward()
            opt.step()
        with torch.no_grad():
            l0s.append(float((sae.encode(src.batch(10_000, 512) * 2) != 0).float().sum(-1).mean()))
    assert l0s[1] < 0.7 * l0s[0], l0s


def _trained_like(scale=1.0):
    torch.manual_seed(0)
    sae = GatedSAE(16, 64)
    with torch.no_grad():
        sae.b_gate.normal_(0, 0.5), sae.b_mag.normal_(0, 0.5), sae.r_mag.normal_(0, 0.3), sae.b_dec.normal_()
    return sae.eval()


def test_export_loads_in_saelens_and_back_into_rsae(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    scale = 0.37
    sae = _trained_like()
    save_sae(sae, tmp_path, scale=scale)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "gated" and "rsae_architecture" not in cfg
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert type(theirs).__name__ == "GatedSAE"
    x = torch.randn(40, 16) * 3  # raw activations
    with torch.no_grad():
        z_ref = sae.encode(x * scale)
        assert 0 < int((z_ref != 0).sum()) < z_ref.numel()
        torch.testing.assert_close(theirs.encode(x), z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae.decode(z_ref) / scale, rtol=1e-4, atol=1e-4)
        ours = load_sae(tmp_path)
        assert type(ours) is GatedSAE and ARCHITECTURES["gated"] is GatedSAE
        torch.testing.assert_close(ours.encode(x), z_ref, rtol=1e-5, atol=1e-5)


def test_saelens_written_gated_sae_loads_into_rsae(tmp_path):
    pytest.importorskip("sae_lens")
    from sae_lens.saes.gated_sae import GatedSAE as TheirGated
    from sae_lens.saes.gated_sae import GatedSAEConfig

    for centred in (True, False):  # apply_b_dec_to_input false: both paths' biases take the shift
        torch.manual_seed(1)
        theirs = TheirGated(GatedSAEConfig(d_in=8, d_sae=24, apply_b_dec_to_input=centred))
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_(0, 0.5)
        theirs.save_model(str(tmp_path / str(centred)))
        ours = load_sae(tmp_path / str(centred))
        x = torch.randn(50, 8)
        with torch.no_grad():
            z = theirs.encode(x)
            assert 0 < int((z != 0).sum()) < z.numel()
            torch.testing.assert_close(ours.encode(x), z, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours(x), theirs.decode(z), rtol=1e-5, atol=1e-5)


def test_an_export_without_a_gate_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_sae(_trained_like(), tmp_path)
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    del tensors["b_gate"]
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(Exception, match="b_gate") as info:
        load_sae(tmp_path)
    assert "\n" not in str(info.value)


def test_upgrade_copies_the_magnitude_path_and_keeps_the_gate_as_thresholds():
    teacher = _trained_like()
    rsae = RationalSAE.from_teacher(teacher)
    assert rsae.gate == "jumprelu" and rsae.rational_gate.degrees == (9, 8)
    torch.testing.assert_close(rsae.W_enc, teacher.W_enc * teacher.r_mag.exp())
    assert torch.equal(rsae.b_enc, teacher.b_mag) and torch.equal(rsae.W_dec, teacher.W_dec)
    x = torch.randn(200, 16) * 3
    with torch.no_grad():
        h = teacher.pre_acts(x)
        torch.testing.assert_close(rsae.pre_acts(x), h)
        z_t = teacher.activation(h)
        # the jumprelu mask at max(theta, 0) fires on exactly the teacher's latents
        assert torch.equal((h > rsae.threshold) & (h > 0), z_t != 0)
    stats = rsae.calibrate(h, z_t, steps=50)
    with torch.no_grad():
        z = rsae.activation(h)
        assert torch.equal(z != 0, z_t != 0) and stats["rel_l2_after"] < 0.05


def test_train_cli_on_synthetic_data(tmp_path):
    run_train("sae=gated", "trainer.max_steps=300", f"hydra.run.dir={tmp_path}", "data=synthetic", "logger=csv",
              "data.batch_size=256", "trainer.val_check_interval=100")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["val/fvu"] < 0.5, metrics
    assert 0 < metrics["val/l0"] < 256
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert "train/aux_recon_loss" in rows[0] and "train/l1_loss" in rows[0]  # the gate path's losses are logged
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "gated"
    assert type(load_sae(tmp_path / "sae")) is GatedSAE


def test_a_teacher_no_mask_reproduces_is_refused_in_one_line():
    class OwnMechanism(GatedSAE):  # no `architecture`: not registered
        def upgrade_threshold(self):
            return None

    with pytest.raises(ConfigError, match="cannot upgrade a OwnMechanism: its mechanism 'gated' is no rational SAE mask"):
        RationalSAE.from_teacher(OwnMechanism(4, 8))
