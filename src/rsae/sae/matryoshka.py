"""Matryoshka BatchTopK SAE: nested prefixes of the dictionary each reconstruct the input.

The latents are split into groups; prefix i is the first i groups (cumulative widths
`matryoshka_widths`, the last = d_sae). Selection is BatchTopK's (k*B largest over the batch, a
global EMA threshold at inference), and the loss adds, to the full reconstruction's MSE and AuxK,
the MSE of every inner prefix's reconstruction `z[:, :w] @ W_dec[:w] + b_dec`: a plain sum, as
SAELens's `matryoshka_batchtopk` trains (Bussmann et al. 2025). Early groups so learn the
frequent, general features on their own.

Inference is BatchTopK's, a JumpReLU with one threshold: it exports as SAELens `jumprelu` with
`rsae_architecture: matryoshka` and the widths, so rsae restores this class.
"""

from __future__ import annotations

from torch import Tensor

from rsae.sae.base import SAEOutput, require, resolve_d_sae
from rsae.sae.batchtopk import BatchTopKSAE


def resolve_widths(group_sizes: list | None, d_sae: int) -> list[int]:
    """Cumulative prefix widths from group sizes: integers summing to d_sae, or fractions summing
    to 1 (rounded; the last group takes the remainder). None: a single group (plain BatchTopK)."""
    if group_sizes is None:
        return [d_sae]
    sizes = list(group_sizes)
    require(len(sizes) >= 1 and all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in sizes),
            f"group_sizes must be a non-empty list of positive numbers, got {group_sizes}")
    if all(isinstance(s, int) for s in sizes):
        require(sum(sizes) == d_sae, f"group_sizes must sum to d_sae ({d_sae}), got {sizes} (sum {sum(sizes)})")
    else:
        require(abs(sum(sizes) - 1) < 1e-6, f"group_sizes as fractions must sum to 1, got {sizes}")
        sizes = [round(s * d_sae) for s in sizes[:-1]]
        sizes.append(d_sae - sum(sizes))
        require(all(s >= 1 for s in sizes), f"group_sizes give an empty group at d_sae={d_sae}: {sizes}")
    widths, total = [], 0
    for s in sizes:
        total += s
        widths.append(total)
    return widths


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"

    def __init__(self, d_in: int, d_sae: int | None = None, group_sizes: list | None = None,
                 k: int = 32, **kw) -> None:
        d_sae = resolve_d_sae(d_in, d_sae, kw.pop("expansion_factor", None))
        widths = resolve_widths(group_sizes, d_sae)
        super().__init__(d_in, d_sae, k=k, **kw)
        self.matryoshka_widths = widths

    def aux_losses(self, x: Tensor, out: SAEOutput, step: int) -> dict[str, Tensor]:
        losses = super().aux_losses(x, out, step)  # AuxK (TopK's, outside compiled graphs)
        z, x32 = out.z, x.float()
        decoded, start = self.b_dec, 0
        for width in self.matryoshka_widths[:-1]:  # the outermost prefix is the base `mse`
            decoded = decoded + z[:, start:width] @ self.W_dec[start:width]
            losses[f"mse_{width}"] = (decoded.float() - x32).pow(2).sum(-1).mean()
            start = width
        return losses

    def export_config(self) -> dict:
        return {**super().export_config(), "rsae_architecture": "matryoshka",
                "matryoshka_widths": list(self.matryoshka_widths)}

    @classmethod
    def export_fields(cls, read) -> tuple[dict, dict]:
        fields, tensors = super().export_fields(read)
        return {**fields, "matryoshka_widths": read.widths("matryoshka_widths")}, tensors

    @classmethod
    def kwargs_from_export(cls, cfg: dict) -> dict:
        widths = [int(w) for w in cfg.get("matryoshka_widths") or []]
        sizes = [b - a for a, b in zip([0, *widths[:-1]], widths)] or None
        return {**super().kwargs_from_export(cfg), "group_sizes": sizes}
