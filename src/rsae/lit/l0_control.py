"""Hold a target L0 during training by adapting a sparsity coefficient.

After every step the coefficient is multiplied by (L0_ema / target) ** rate: too dense raises
the penalty, too sparse lowers it. Used by the RSAE upgrade to fine-tune at the teacher's L0 so
that MSE is compared at equal sparsity.
"""

from __future__ import annotations

import math

import lightning as L


class HoldL0(L.Callback):
    def __init__(self, target_l0: float, attribute: str = "l1_coefficient", rate: float = 0.05, ema: float = 0.9,
                 min_value: float = 1e-8, max_value: float = 1e4) -> None:
        if target_l0 <= 0:
            raise ValueError(f"target_l0 must be > 0, got {target_l0}")
        self.target_l0, self.attribute, self.rate, self.ema = float(target_l0), attribute, rate, ema
        self.min_value, self.max_value = min_value, max_value
        self.l0_ema: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        l0 = getattr(pl_module, "last_train_l0", None)  # this step's L0 (SAEModule keeps it every step)
        if l0 is None:
            return
        l0 = float(l0)
        self.l0_ema = l0 if self.l0_ema is None else self.ema * self.l0_ema + (1 - self.ema) * l0
        sae = pl_module.sae
        coef = getattr(sae, self.attribute)
        coef = max(coef, self.min_value) * math.exp(self.rate * math.log(max(self.l0_ema, 1e-3) / self.target_l0))
        setattr(sae, self.attribute, min(max(coef, self.min_value), self.max_value))
        pl_module.log(f"train/{self.attribute}", getattr(sae, self.attribute), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"l0_ema": self.l0_ema}

    def load_state_dict(self, state_dict: dict) -> None:
        self.l0_ema = state_dict.get("l0_ema")
