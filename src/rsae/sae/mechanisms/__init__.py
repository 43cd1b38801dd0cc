"""Sparsity mechanisms as shared parts: each file holds one mechanism's reference maths.

* `relu`: z = relu(h), L1 on |z_j| ||W_dec_j|| with a linear warm-up;
* `jumprelu`: z = h H(h - theta), the straight-through step and its L0 count;
* `topk`: the k largest of each row, AuxK over the dead latents;
* `batchtopk`: the k * B largest of a batch, the inference threshold's EMA.

The fixed-gate SAEs are the skeleton (`rsae.sae.base.SAE`) plus one of them; the rational SAE is
the skeleton plus `RationalGate` plus any of them as its mask (`MASKS`, by the `gate` setting).
"""

from rsae.sae.mechanisms.base import Mask
from rsae.sae.mechanisms.jumprelu import JumpReLUMask
from rsae.sae.mechanisms.relu import ReLUMask
from rsae.sae.mechanisms.topk import TopKMask

# The rational SAE's `gate` setting -> its mask (stateless: one instance each).
MASKS: dict[str, Mask] = {m.name: m for m in (Mask(), ReLUMask(), JumpReLUMask(), TopKMask())}
GATES = tuple(MASKS)  # none, relu, jumprelu, topk

__all__ = ["Mask", "MASKS", "GATES"]
