"""Rational SAEs in SAELens: importing this module registers the `rational` architecture with
SAELens (6.x), so `sae_lens.SAE.load_from_disk(<rsae export>)` returns a SAELens SAE whose
`encode` / `decode` / `forward` (hooks included) are rsae's.

    import rsae.integrations.saelens  # noqa: F401  (registers "rational")
    from sae_lens import SAE
    sae = SAE.load_from_disk("outputs/<run>/sae")

SAELens has no plugin discovery (no entry points): the import above is what registers the class.
The codes are computed by rsae's own code, not a copy of its maths: the gate is an
`rsae.rational.RationalGate` (the pure-torch reference; the fused kernel on CUDA) and the mask is
the rational SAE's own (`rsae.sae.mechanisms.MASKS[gate]`), with this module as its owner: it
carries the attributes the mask reads (rational_gate, threshold, bandwidth, k). The export already works on raw activations
(`rsae.io.saelens.save_sae` folds the activation scale into W_enc / W_dec / b_dec), so nothing
is rescaled here. Inference only: training stays in rsae.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

try:
    from sae_lens import SAE, SAEConfig, register_sae_class
    from sae_lens.registry import SAE_CLASS_REGISTRY
except ImportError as exc:  # the optional extra is missing
    raise ImportError("rsae.integrations.saelens needs SAELens 6.x: pip install 'sae-lens>=6,<7'") from exc

from rsae.rational.function import T_MAX
from rsae.rational.gate import RationalGate, exact_log
from rsae.sae.mechanisms import GATES, MASKS

ARCHITECTURE = "rational"

# Exported tensor -> this module's parameter (c_in / c_out are stored by their logs, as in rsae).
_GATE_TENSORS = {"rational_a": "rational_gate.a", "rational_b": "rational_gate.b",
                 "rational_c_in": "rational_gate.log_c_in", "rational_c_out": "rational_gate.log_c_out"}
_LOG_STORED = ("rational_c_in", "rational_c_out")


@dataclass
class RationalSAELensConfig(SAEConfig):
    """The `cfg.json` fields of an rsae rational export (names as rsae writes them; defaults as
    rsae reads them). `sparsity`, `init_table` and `rsae_activation_scale` are provenance only."""

    degrees: list[int] | None = None
    denominator: str = "B"
    sharing: str = "shared"
    n_groups: int = 1
    scale_mode: str = "latent"
    t_max: float = T_MAX
    gate: str = "relu"
    k: int | None = None
    bandwidth: float = 0.05
    sparsity: str = "codes"
    init_table: str | None = None
    rsae_activation_scale: float = 1.0

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.degrees is None or len(self.degrees) != 2:
            raise ValueError(f"rational SAE config: degrees must be [p, q], got {self.degrees!r}")
        if self.gate not in GATES:
            raise ValueError(f"rational SAE config: gate must be one of {GATES}, got {self.gate!r}")
        if self.gate == "topk" and not (self.k is not None and 0 < int(self.k) <= self.d_sae):
            raise ValueError(f"rational SAE config: gate=topk needs k with 0 < k <= d_sae ({self.d_sae}), got {self.k!r}")


class RationalSAELens(SAE[RationalSAELensConfig]):
    """An rsae Rational SAE as a SAELens `SAE`: z = mask(h) * C_out r(h / C_in),
    h = (x - b_dec) W_enc + b_enc, x_hat = z W_dec + b_dec."""

    b_enc: nn.Parameter
    rational_gate: RationalGate
    threshold: nn.Parameter  # gate=jumprelu only

    def __init__(self, cfg: RationalSAELensConfig, use_error_term: bool = False):
        self.gate, self.bandwidth = cfg.gate, float(cfg.bandwidth)
        self.k = int(cfg.k) if cfg.k is not None else None
        super().__init__(cfg, use_error_term)

    def initialize_weights(self) -> None:
        super().initialize_weights()
        cfg = self.cfg
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype, device=self.device))
        if cfg.gate == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype, device=self.device))
        gate = RationalGate(cfg.d_sae, degrees=tuple(int(x) for x in cfg.degrees), denominator=cfg.denominator,
                            sharing=cfg.sharing, n_groups=int(cfg.n_groups), scale_mode=cfg.scale_mode,
                            t_max=float(cfg.t_max))
        # load_from_disk builds on "meta" and then assigns the weights: the gate's derived
        # latent -> set index (a non-saved buffer) must stay real, and it is small.
        self.rational_gate = gate if self.device.type == "meta" else gate.to(device=self.device, dtype=self.dtype)

    def gate_mask(self, h: Tensor) -> Tensor | None:
        return MASKS[self.gate](h, self)

    def activation(self, h: Tensor) -> Tensor:
        return MASKS[self.gate].codes(self.rational_gate, h, self)

    def encode(self, x: Tensor) -> Tensor:
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(self.activation(hidden_pre))

    def decode(self, feature_acts: Tensor) -> Tensor:
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    # --- the exported layout <-> this module -----------------------------------------------------
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        for name, param in _GATE_TENSORS.items():
            if name in state_dict:
                value = state_dict.pop(name)
                state_dict[param] = exact_log(value).to(value.dtype) if name in _LOG_STORED else value

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        for name, param in _GATE_TENSORS.items():
            if param in state_dict:
                value = state_dict.pop(param)
                state_dict[name] = value.exp() if name in _LOG_STORED else value

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Unit decoder rows with the same reconstruction: h_j and z_j grow by n_j = ||W_dec_j||,
        so C_in, C_out (and thresholds) grow by n_j too. Needs per-latent scales, and a mask that
        does not compare latents (not topk)."""
        if self.cfg.gate == "topk" or self.cfg.scale_mode != "latent":
            raise NotImplementedError(f"fold_W_dec_norm needs scale_mode=latent and a gate other than topk; "
                                      f"this rational SAE has scale_mode={self.cfg.scale_mode}, gate={self.cfg.gate}")
        threshold = self.threshold.clone() if self.cfg.gate == "jumprelu" else None
        norms = self.fold_and_get_W_dec_norm()
        g = self.rational_gate
        g.set_scales(g.c_in.float() * norms.float(), g.c_out.float() * norms.float())
        if threshold is not None:
            self.threshold.data = threshold * norms


def register() -> None:
    """Register `rational` with SAELens (once; importing this module does it)."""
    if ARCHITECTURE not in SAE_CLASS_REGISTRY:
        register_sae_class(ARCHITECTURE, RationalSAELens, RationalSAELensConfig)


register()

__all__ = ["RationalSAELens", "RationalSAELensConfig", "register"]
