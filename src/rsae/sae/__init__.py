"""Plain-torch SAE architectures over a shared base, and a registry by exported name.

Each architecture registers itself by declaring `architecture` (`rsae.sae.base.ARCHITECTURES`);
importing its module here is what loads it.
"""

from rsae.sae.base import ARCHITECTURES, SAE, ConfigError, SAEOutput

# isort: off  (the order in which they register is the registry's order, as error messages list it)
from rsae.sae.relu import ReLUSAE
from rsae.sae.jumprelu import JumpReLUSAE
from rsae.sae.topk import TopKSAE
from rsae.sae.batchtopk import BatchTopKSAE
from rsae.sae.matryoshka import MatryoshkaSAE
from rsae.sae.gated import GatedSAE
from rsae.sae.rational import RationalSAE
# isort: on


__all__ = ["SAE", "SAEOutput", "ConfigError", "ReLUSAE", "JumpReLUSAE", "TopKSAE", "BatchTopKSAE", "MatryoshkaSAE",
           "GatedSAE", "RationalSAE", "ARCHITECTURES"]
