"""HoldL0 reads the step's L0 from the module and moves the sparsity coefficient towards the target."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rsae.lit.l0_control import HoldL0


def step(cb: HoldL0, module, l0: float) -> float:
    module.last_train_l0 = torch.tensor(l0)
    cb.on_train_batch_end(None, module, None, None, 0)
    return module.sae.l1_coefficient


def test_hold_l0_raises_the_penalty_when_too_dense_and_lowers_it_when_too_sparse():
    module = SimpleNamespace(sae=SimpleNamespace(l1_coefficient=1.0), log=lambda *a, **k: None)
    cb = HoldL0(target_l0=10.0, rate=0.1, ema=0.0)
    assert step(cb, module, 40.0) > 1.0  # 4x too dense: penalty up
    up = module.sae.l1_coefficient
    assert step(cb, module, 2.5) < up  # 4x too sparse: penalty down
    before = module.sae.l1_coefficient
    assert abs(step(cb, module, 10.0) - before) < 1e-12  # on target: unchanged


def test_hold_l0_waits_for_a_first_l0():
    module = SimpleNamespace(sae=SimpleNamespace(l1_coefficient=1.0), log=lambda *a, **k: None)
    cb = HoldL0(target_l0=10.0)
    cb.on_train_batch_end(None, module, None, None, 0)  # no last_train_l0 yet
    assert module.sae.l1_coefficient == 1.0 and cb.l0_ema is None
