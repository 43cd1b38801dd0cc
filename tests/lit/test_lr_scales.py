"""module.lr_scales: learning-rate multipliers by parameter-name prefix."""

import pytest
import torch

from rsae.errors import ConfigError
from rsae.lit.module import SAEModule
from rsae.sae import JumpReLUSAE


def test_lr_scales_make_parameter_groups_and_move_the_threshold_faster():
    torch.manual_seed(0)
    x = torch.randn(256, 8)

    def threshold_change(scales):
        sae = JumpReLUSAE(8, 32, l0_coefficient=1.0, bandwidth=1.0, init_threshold=0.5, init_seed=0)
        module = SAEModule(sae, lr=1e-3, warmup_steps=0, grad_clip=None, lr_scales=scales)
        opt = torch.optim.Adam(module._param_groups(), lr=module.lr)  # what configure_optimizers builds
        before = sae.log_threshold.detach().clone()
        for step in range(5):
            loss = sae.training_output(x, step).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return opt, float((sae.log_threshold.detach() - before).abs().max())

    opt, fast = threshold_change({"log_threshold": 10.0})
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([1e-3, 1e-2])
    _, slow = threshold_change({})
    # Adam moves each parameter by about lr per step: ten times the rate, about ten times the move.
    assert fast > 5 * slow


def test_lr_scales_reject_unknown_prefix_and_bad_values():
    sae = JumpReLUSAE(8, 32)
    with pytest.raises(ConfigError, match="no parameter"):
        SAEModule(sae, lr_scales={"rational_gate.": 10.0})
    with pytest.raises(ConfigError, match="must be a number >= 0"):
        SAEModule(sae, lr_scales={"log_threshold": -1.0})
    with pytest.raises(ConfigError, match="must be a number >= 0"):
        SAEModule(sae, lr_scales={"log_threshold": float("nan")})
    frozen = SAEModule(sae, lr=1e-3, lr_scales={"log_threshold": 0.0})._param_groups()  # 0 freezes
    assert {g["lr"] for g in frozen} == {0.0, 1e-3}


def test_jumprelu_asks_for_its_threshold_rate_and_module_entries_win():
    sae = JumpReLUSAE(8, 32, threshold_lr_scale=20.0)
    groups = SAEModule(sae, lr=1e-3)._param_groups()
    by_lr = {g["lr"]: g["params"] for g in groups}
    assert set(by_lr) == {1e-3, 2e-2} and by_lr[2e-2] == [sae.log_threshold]
    groups = SAEModule(sae, lr=1e-3, lr_scales={"log_threshold": 3.0})._param_groups()
    assert sorted(g["lr"] for g in groups) == pytest.approx([1e-3, 3e-3])
    assert JumpReLUSAE(8, 32).lr_scales() == {}
