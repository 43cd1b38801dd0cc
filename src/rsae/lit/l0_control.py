"""Hold a target L0 during training by adapting a sparsity coefficient.

After every step the coefficient is multiplied by (L0_ema / target) ** rate: too dense raises
the penalty, too sparse lowers it. Used by the RSAE upgrade to fine-tune at the teacher's L0 so
that MSE is compared at equal sparsity.

The EMA and the coefficient live on the device as 0-d tensors, updated in place after each step:
the host never waits for the step's L0 (a `float(l0)` per step made it wait for the GPU every
step), and a step captured as a CUDA graph (`module.cuda_graph`) reads the current coefficient
where it lives. The coefficient becomes a tensor attribute of the SAE after the first step.
Under DDP every rank follows the mean of the ranks' L0, so that all hold the same coefficient.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor


class HoldL0(L.Callback):
    def __init__(self, target_l0: float, attribute: str = "l1_coefficient", rate: float = 0.05, ema: float = 0.9,
                 min_value: float = 1e-8, max_value: float = 1e4) -> None:
        if target_l0 <= 0:
            raise ValueError(f"target_l0 must be > 0, got {target_l0}")
        self.target_l0, self.attribute, self.rate, self.ema = float(target_l0), attribute, rate, ema
        self.min_value, self.max_value = min_value, max_value
        self.l0_ema: float | Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        l0 = getattr(pl_module, "last_train_l0", None)  # this step's L0 (SAEModule keeps it every step)
        if l0 is None:
            return
        with torch.no_grad():
            l0 = torch.as_tensor(l0).detach().float()
            if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                # Each rank measured its own rows: every rank must hold the same coefficient, so all
                # follow the mean L0 (an all-reduce, queued on the device like the rest).
                l0 = l0.clone()
                torch.distributed.all_reduce(l0)  # a sum: gloo has no average
                l0 /= torch.distributed.get_world_size()
            coef = self._coefficient(pl_module.sae, l0.device)
            if self.l0_ema is None:
                ema = l0.clone()
            else:
                ema = self.ema * torch.as_tensor(self.l0_ema, dtype=torch.float32, device=l0.device) + (1 - self.ema) * l0
            self.l0_ema = ema
            factor = torch.exp(self.rate * torch.log(ema.clamp_min(1e-3) / self.target_l0))
            coef.copy_((coef.clamp_min(self.min_value) * factor).clamp(self.min_value, self.max_value))
        pl_module.log(f"train/{self.attribute}", coef.clone(), on_step=True, on_epoch=False)

    def _coefficient(self, sae, device: torch.device) -> Tensor:
        """The SAE's coefficient as a float32 0-d tensor on `device` (installed on the first call)."""
        value = getattr(sae, self.attribute)
        if isinstance(value, Tensor) and value.device == device and value.dtype == torch.float32 and value.ndim == 0:
            return value
        tensor = torch.tensor(float(value), dtype=torch.float32, device=device)
        setattr(sae, self.attribute, tensor)
        return tensor

    def state_dict(self) -> dict:
        return {"l0_ema": None if self.l0_ema is None else float(self.l0_ema)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.l0_ema = state_dict.get("l0_ema")
