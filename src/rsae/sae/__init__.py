"""Plain-torch SAE architectures over a shared base, and a registry by exported name."""

from rsae.sae.base import SAE, ConfigError, SAEOutput
from rsae.sae.batchtopk import BatchTopKSAE
from rsae.sae.jumprelu import JumpReLUSAE
from rsae.sae.matryoshka import MatryoshkaSAE
from rsae.sae.relu import ReLUSAE
from rsae.sae.topk import TopKSAE

# Exported `architecture` (SAELens names, plus our own) -> class.
ARCHITECTURES: dict[str, type[SAE]] = {
    "standard": ReLUSAE,
    "relu": ReLUSAE,
    "jumprelu": JumpReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka": MatryoshkaSAE,
}


def register(name: str, cls: type[SAE]) -> None:
    ARCHITECTURES[name] = cls


__all__ = ["SAE", "SAEOutput", "ConfigError", "ReLUSAE", "JumpReLUSAE", "TopKSAE", "BatchTopKSAE", "MatryoshkaSAE", "ARCHITECTURES", "register"]
from rsae.sae.rational import RationalSAE; register("rational", RationalSAE); __all__ += ["RationalSAE"]  # noqa: E402, E702
