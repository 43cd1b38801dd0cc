"""One training forward pass's result (`SAEOutput`), shared by the reference step (`SAE.training_output`)
and the fast steps (`rsae.sae.fast_step`)."""

from __future__ import annotations

import torch
from torch import Tensor


class SAEOutput:
    """One training forward pass: reconstruction, codes, pre-activations and the loss terms.

    z_abs_sums: the sums of |z| over the batch [d_sae] (float32) when the gate computed them in its
    own pass (`training_codes`): the L1 term and the firing count read them instead of z.
    sparse_codes: (values [B, k], latent indices [B, k]) when the step formed only the k non-zeros
    of each row (TopK's sparse step); z is then built from them on first use."""

    def __init__(self, x_hat: Tensor, z: Tensor | None = None, h: Tensor | None = None,
                 losses: dict[str, Tensor] | None = None, z_abs_sums: Tensor | None = None,
                 sparse_codes: tuple[Tensor, Tensor] | None = None) -> None:
        if z is None and sparse_codes is None:
            raise ValueError("SAEOutput needs the codes: z or sparse_codes")
        self.x_hat, self.h, self.z_abs_sums, self.sparse_codes = x_hat, h, z_abs_sums, sparse_codes
        self._z = z
        self.losses = {} if losses is None else losses  # weighted terms summed into `loss`

    @property
    def z(self) -> Tensor:  # codes [B, d_sae]
        if self._z is None:
            values, indices = self.sparse_codes
            self._z = values.new_zeros((values.shape[0], self.h.shape[-1])).scatter(-1, indices, values)
        return self._z

    def l0(self) -> Tensor:
        """Mean number of non-zero codes per row (float32), without forming z if it was not formed."""
        codes = self._z if self._z is not None else self.sparse_codes[0]
        return (codes.detach() != 0).sum(-1, dtype=torch.float32).mean()

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]
