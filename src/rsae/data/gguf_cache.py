"""A de-quantised copy of each GGUF model, kept so that a GGUF is converted once per machine.

transformers parses a GGUF file three times (config, tokenizer, weights) and de-quantises every
tensor on each load: 15-25 s for the 93 MB SmolLM2-135M file on a 2-core CPU, paid by every run
that harvests, validates with the spliced LM or evaluates. The first load saves the result (config,
safetensors weights, tokenizer) under `<root>/<file stem>-<sha256 prefix>-<dtype>/`, where root
is `$RSAE_LM_CACHE`, else `$RSAE_CACHE/lm`, else `.cache/rsae/lm`; later loads read that in about
half a second. The copy holds the same tensors and tokenizer: logits and token ids are identical
(tests/data/test_gguf_cache.py).

It is an optimisation only: `RSAE_LM_CACHE=off` turns it off, a copy that cannot be written is
skipped with a warning, and one that cannot be read is deleted and written again.
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from pathlib import Path

import torch

OFF = {"0", "off", "false", "no"}


def converted_dir(gguf_path: Path, dtype: torch.dtype, sha256: str) -> Path | None:
    """Where the de-quantised copy of `gguf_path` in `dtype` lives; None when turned off."""
    setting = os.environ.get("RSAE_LM_CACHE", "")
    if setting.lower() in OFF:
        return None
    root = Path(setting) if setting else Path(os.environ.get("RSAE_CACHE", ".cache/rsae")) / "lm"
    return root.expanduser() / f"{gguf_path.stem}-{sha256[:16]}-{str(dtype).removeprefix('torch.')}"


def any_converted(gguf_path: Path, sha256: str) -> Path | None:
    """A saved copy of `gguf_path` in any dtype (its tokenizer is the same in all), or None."""
    folder = converted_dir(gguf_path, torch.float32, sha256)
    if folder is None or not folder.parent.is_dir():
        return None
    return next((d for d in sorted(folder.parent.glob(f"{gguf_path.stem}-{sha256[:16]}-*"))
                 if (d / "tokenizer_config.json").is_file() and ".tmp-" not in d.name), None)


def load_converted(directory: Path, dtype: torch.dtype):
    """`(model, tokenizer)` from a saved copy, or None when there is none (or it is unreadable)."""
    if not (directory / "config.json").is_file():
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable copy is rebuilt from the GGUF
        warnings.warn(f"unreadable converted model {directory} ({type(err).__name__}: {err}); converting the GGUF again",
                      stacklevel=2)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return model, tokenizer


def save_converted(model, tokenizer, directory: Path) -> None:
    """Write the copy to a temporary directory, then rename it into place: a reader never sees a
    partial copy, and of two runs converting at once the second's copy is dropped."""
    from safetensors.torch import save_model

    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):  # the weights are de-quantised already
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # drops the tied duplicates; loading re-ties them
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, directory)
    except OSError as err:
        if not (directory / "config.json").is_file():
            warnings.warn(f"cannot keep a converted copy of the GGUF model at {directory}: {err}", stacklevel=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
