"""A mechanism as the rational SAE wears it: the mask m(h) in z = phi(h) * m(h), its own loss terms,
its state and its export fields. One subclass per mechanism file, one instance each (`MASKS`).

Masks hold no tensors and no settings: what they read (`threshold`, `k`, `bandwidth`, the loss
coefficients) are attributes of the owner, the rational SAE or its SAELens twin
(`rsae.integrations.saelens`), so state-dict keys, plain settings a captured step is keyed by, and
coefficients a controller adapts (HoldL0) all stay the owner's.
"""

from __future__ import annotations

from torch import Tensor


class Mask:
    """No mask: z = phi(h), the pure rational gate (exact L0 is d_sae)."""

    name = "none"
    positive_only = False  # the mask is [h > 0], which the rational kernel applies in its own pass
    kernel_alone = True  # the rational kernel forms the codes by itself (no mask, or positive_only),
    # and so can also form the column sums of |z| (`RationalSAE.training_codes`)

    def check(self, d_sae: int, k: int | None) -> None:
        """Refuse settings this mask cannot work with (one-line ConfigError)."""

    def add_state(self, owner, init_threshold: float) -> None:
        """Register the mask's parameters on the owner (their names are state-dict keys)."""

    def __call__(self, h: Tensor, owner) -> Tensor | None:
        """The 0/1 mask in h's dtype, or None for no mask."""
        return None

    def codes(self, rational_gate, h: Tensor, owner) -> Tensor:
        """z = phi(h) * m(h)."""
        if self.positive_only:  # phi(h) * [h > 0] in one pass on the GPU
            return rational_gate(h, positive_only=True)
        phi = rational_gate(h)
        mask = self(h, owner)
        return phi if mask is None else phi * mask

    def penalises_codes(self, sparsity: str) -> bool:
        """Whether the L1 term is on |z| (`sparsity: codes`, and always without a mask)."""
        return True

    def own_magnitudes(self, out) -> Tensor | None:
        """What the L1 term penalises under `sparsity: mask` (None: no L1 term)."""
        return out.z.float().abs()

    def losses(self, owner, x: Tensor, out, step) -> dict[str, Tensor]:
        """The mask's own loss terms besides the rational SAE's L1 term."""
        return {}

    def uses_auxk(self, owner) -> bool:
        return False

    def sparsity_lever(self, sparsity: str) -> str | None:
        """The coefficient a controller (HoldL0) adapts to hold L0 (None: L0 is fixed)."""
        return "l1_coefficient"

    def export_config(self, owner) -> dict:
        return {}

    def export_tensors(self, owner) -> dict[str, Tensor]:
        return {}

    def load_exported(self, owner, tensors: dict[str, Tensor]) -> None:
        pass

    def export_fields(self, read) -> tuple[dict, dict]:
        """The mask's `cfg.json` fields and tensors (see `SAE.export_fields`)."""
        return {}, {}

    def kwargs_from_export(self, cfg: dict) -> dict:
        return {}

    def copy_from_teacher(self, owner, teacher, threshold: Tensor | None) -> None:
        """Take the teacher's own mask state (JumpReLU: its thresholds)."""


def switched_on(coefficient: float | Tensor) -> bool:
    """Whether a loss term is on, without reading a device value: a tensor coefficient is one a
    controller holds (HoldL0, always > 0)."""
    return isinstance(coefficient, Tensor) or coefficient > 0
