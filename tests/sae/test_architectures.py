import pytest
import torch

from rsae.sae import ARCHITECTURES, SAE, BatchTopKSAE, ConfigError, GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE


def test_shapes_and_skeleton():
    torch.manual_seed(0)
    sae = ReLUSAE(d_in=8, d_sae=32)
    x = torch.randn(5, 8)
    out = sae.training_output(x)
    assert out.z.shape == (5, 32) and out.x_hat.shape == (5, 8)
    h = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(out.h, h)
    torch.testing.assert_close(out.x_hat, torch.relu(h) @ sae.W_dec + sae.b_dec)
    assert set(out.losses) == {"mse", "l1"}


def test_encoder_initialised_as_decoder_transpose_and_unit_rows():
    sae = TopKSAE(d_in=8, d_sae=32, k=4)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_expansion_factor():
    assert ReLUSAE(d_in=8, expansion_factor=4).d_sae == 32
    with pytest.raises(ConfigError):
        ReLUSAE(d_in=8, d_sae=16, expansion_factor=4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TopKSAE(8, 32, k=0),
        lambda: TopKSAE(8, 32, k=33),
        lambda: BatchTopKSAE(8, 32, k=-1),
        lambda: ReLUSAE(8, 0),
        lambda: ReLUSAE(8, 32, l1_coefficient=-1.0),
        lambda: JumpReLUSAE(8, 32, l0_coefficient=-0.1),
        lambda: JumpReLUSAE(8, 32, bandwidth=0.0),
        lambda: TopKSAE(8, 32, aux_coefficient=-1.0),
        lambda: GatedSAE(8, 32, l1_coefficient=-1.0),
        lambda: GatedSAE(8, 32, l1_warmup_steps=-1),
        lambda: GatedSAE(8, 32, aux_coefficient=-0.5),
    ],
)
def test_impossible_hyperparameters_raise(make):
    with pytest.raises(ConfigError):
        make()


def test_wrong_input_shape_is_one_line_error():
    sae = ReLUSAE(8, 16)
    with pytest.raises(ConfigError, match=r"\[batch, 8\]"):
        sae.training_output(torch.randn(4, 7))


def test_topk_exactly_k_active():
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, k=5)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # all pre-activations positive, so exactly k survive the ReLU
    z = sae.encode(torch.randn(64, 8))
    assert ((z != 0).sum(-1) == 5).all()


def test_batchtopk_keeps_k_times_batch_and_tracks_threshold():
    torch.manual_seed(0)
    sae = BatchTopKSAE(8, 32, k=4, threshold_ema=0.5)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)
    x = torch.randn(16, 8)
    sae.train()
    z = sae.training_output(x).z
    assert int((z != 0).sum()) == 4 * 16
    per_token = (z != 0).sum(-1)
    assert per_token.min() != per_token.max() or per_token[0] == 4  # batch-level, not per token
    thr = float(sae.inference_threshold)
    assert thr == pytest.approx(float(z.detach()[z > 0].min()))
    sae.eval()
    z_eval = sae.encode(x)
    assert torch.equal(z_eval != 0, sae.pre_acts(x) > thr)


def test_auxk_loss_only_with_dead_latents_and_it_trains_dead_latents():
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, k=2, dead_after_tokens=10)
    x = torch.randn(64, 8)
    assert "aux" not in sae.training_output(x).losses or sae.training_output(x).losses["aux"] == 0
    sae.tokens_since_fired.fill_(100)  # everything looks dead now
    sae.tokens_since_fired[:2] = 0
    out = sae.training_output(x)
    assert out.losses["aux"] > 0
    out.loss.backward()
    dead_cols = sae.W_enc.grad[:, 2:].abs().sum()
    assert dead_cols > 0  # the aux loss reaches dead latents' encoder weights


def test_dead_latent_tracking_counts_tokens():
    sae = ReLUSAE(4, 8)
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([10.0] * 4 + [-10.0] * 4))
        sae.W_enc.zero_()
    sae.training_output(torch.randn(7, 4))
    sae.training_output(torch.randn(5, 4))
    assert sae.tokens_since_fired.tolist() == [0] * 4 + [12] * 4


def test_decoder_gradient_projection_keeps_unit_norm():
    torch.manual_seed(0)
    sae = ReLUSAE(8, 16)
    opt = torch.optim.SGD(sae.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        sae.training_output(torch.randn(32, 8)).loss.backward()
        sae.remove_parallel_decoder_grad()
        w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
        assert (sae.W_dec.grad * w).sum(1).abs().max() < 1e-5
        opt.step()
        sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))


def test_jumprelu_threshold_gets_gradient_from_l0_penalty():
    torch.manual_seed(0)
    sae = JumpReLUSAE(8, 16, l0_coefficient=1.0, bandwidth=1.0, init_threshold=0.5)
    x = torch.randn(256, 8) * 2
    out = sae.training_output(x)
    out.losses["l0"].backward()
    g = sae.log_threshold.grad
    assert g is not None and (g < 0).any()  # raising the threshold lowers the L0 penalty
    assert (g <= 0).all()


def test_jumprelu_l0_follows_its_coefficient():
    """Thresholds must move: a larger L0 coefficient gives a sparser SAE."""
    from rsae.data.synthetic import SyntheticFeatures

    src = SyntheticFeatures(16, 64, 6.0, 0.5, 0.5, 1.5, 0.0, seed=1)
    l0s = []
    for coef in (0.0, 0.2):
        torch.manual_seed(0)
        sae = JumpReLUSAE(16, 64, l0_coefficient=coef, bandwidth=0.1, init_threshold=0.1)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        for i in range(200):
            x = src.batch(i, 256) * 2
            opt.zero_grad()
            sae.training_output(x).loss.backward()
            opt.step()
        with torch.no_grad():
            l0s.append(float((sae.encode(src.batch(10_000, 512) * 2) != 0).float().sum(-1).mean()))
    assert l0s[1] < 0.7 * l0s[0], l0s


def test_registry_names():
    assert ARCHITECTURES["standard"] is ReLUSAE and ARCHITECTURES["topk"] is TopKSAE
    assert ARCHITECTURES["gated"] is GatedSAE


@pytest.mark.parametrize("attrs", [{"architecture": "topk"}, {"architecture": "mine", "aliases": ("relu",)}])
def test_a_taken_architecture_name_is_refused_naming_both_classes(attrs):
    before = dict(ARCHITECTURES)
    with pytest.raises(TypeError) as info:
        type("Clash", (SAE,), dict(attrs))
    message = str(info.value)
    assert "\n" not in message and "Clash" in message
    assert ("rsae.sae.topk.TopKSAE" if attrs["architecture"] == "topk" else "rsae.sae.relu.ReLUSAE") in message
    assert ARCHITECTURES == before  # nothing registered, not even the free name "mine"


def test_auxk_weight_scales_with_the_number_of_dead_latents():
    """min(n_dead / k_aux, 1): one dead latent with k_aux=4 weighs a quarter of the unscaled loss."""
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, k=2, k_aux=4, dead_after_tokens=10)
    x = torch.randn(64, 8)
    sae.tokens_since_fired.fill_(0)
    sae.tokens_since_fired[5] = 100  # exactly one dead latent
    out = sae.training_output(x)
    z_aux = torch.zeros_like(out.h)
    z_aux[:, 5] = out.h[:, 5].relu()
    e = (x - out.x_hat).detach()
    unscaled = sae.aux_coefficient * ((z_aux @ sae.W_dec - e) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.losses["aux"], unscaled * 0.25)
