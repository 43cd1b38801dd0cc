"""HoldL0 reads the step's L0 from the module and moves the sparsity coefficient towards the target,
on the device (a 0-d tensor updated in place, no host wait)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rsae.lit.l0_control import HoldL0


def step(cb: HoldL0, module, l0: float) -> float:
    module.last_train_l0 = torch.tensor(l0)
    cb.on_train_batch_end(None, module, None, None, 0)
    return float(module.sae.l1_coefficient)


def test_hold_l0_raises_the_penalty_when_too_dense_and_lowers_it_when_too_sparse():
    module = SimpleNamespace(sae=SimpleNamespace(l1_coefficient=1.0), log=lambda *a, **k: None)
    cb = HoldL0(target_l0=10.0, rate=0.1, ema=0.0)
    up = step(cb, module, 40.0)
    assert up > 1.0  # 4x too dense: penalty up
    down = step(cb, module, 2.5)
    assert down < up  # 4x too sparse: penalty down
    assert step(cb, module, 10.0) == down  # on target: unchanged


def test_hold_l0_waits_for_a_first_l0():
    module = SimpleNamespace(sae=SimpleNamespace(l1_coefficient=1.0), log=lambda *a, **k: None)
    cb = HoldL0(target_l0=10.0)
    cb.on_train_batch_end(None, module, None, None, 0)  # no last_train_l0 yet
    assert module.sae.l1_coefficient == 1.0 and cb.l0_ema is None


def test_hold_l0_follows_the_rule_and_updates_the_coefficient_in_place():
    """The device-side update is the documented rule (computed here in float64), the coefficient
    is one tensor updated in place (a captured step reads it where it lives), and the EMA survives
    a checkpoint as a plain float."""
    module = SimpleNamespace(sae=SimpleNamespace(l1_coefficient=2.0), log=lambda *a, **k: None)
    cb = HoldL0(target_l0=20.0, rate=0.05, ema=0.9, min_value=1e-3, max_value=50.0)
    coef, ema = 2.0, None
    tensor = None
    for l0 in [35.0, 31.0, 26.0, 18.0, 12.0, 60.0, 1e-5, 20.0]:
        got = step(cb, module, l0)
        tensor = tensor if tensor is not None else module.sae.l1_coefficient
        assert module.sae.l1_coefficient is tensor
        ema = l0 if ema is None else 0.9 * ema + 0.1 * l0
        coef = min(max(max(coef, 1e-3) * math.exp(0.05 * math.log(max(ema, 1e-3) / 20.0)), 1e-3), 50.0)
        assert got == pytest.approx(coef, rel=1e-5)
    assert cb.state_dict()["l0_ema"] == pytest.approx(ema, rel=1e-5)
    restored = HoldL0(target_l0=20.0)
    restored.load_state_dict(cb.state_dict())
    assert isinstance(restored.l0_ema, float)


def test_a_compiled_step_reads_the_held_coefficient_in_place_without_recompiling():
    """What HoldL0's tensor coefficient is for: the compiled (and, on CUDA, captured) step reads
    the current value; a float attribute would be a constant of the compiled code instead."""
    from rsae.lit.module import SAEModule
    from rsae.sae import ReLUSAE

    sae = ReLUSAE(16, 64, l1_coefficient=0.5)
    module = SAEModule(sae, compile=True)
    sae.l1_coefficient = torch.tensor(0.5)
    x = torch.randn(32, 16)
    fn = module.step_fn("train")
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = float(fn(x, module.step_as_tensor(0, x.device))[1]["l1"])
        sae.l1_coefficient.mul_(3.0)
        second = float(fn(x, module.step_as_tensor(1, x.device))[1]["l1"])
    assert second == pytest.approx(3 * first, rel=1e-6)
