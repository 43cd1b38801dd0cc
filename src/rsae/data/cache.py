"""The activation cache: a directory with `manifest.json` and safetensors shards per split.

Layout::

    <cache_dir>/manifest.json            written last, atomically: the cache is complete
    <cache_dir>/progress.json            while harvesting: the request and the shards done so far
    <cache_dir>/train/00000.safetensors  "acts" [n, d_in] (bf16 or fp32), "tokens" [n] int32,
                                         "seq" [n] int32 (sequence index), "pos" [n] int32
    <cache_dir>/val/00000.safetensors    same, held-out sequences
    <cache_dir>/eval_tokens.safetensors  "input_ids" [n_val_seq, ctx] int64, "keep" [.., ..] bool
    <cache_dir>/hashed.json              files whose sha256 matched, with the size and mtime they had

Rows are the kept positions (no BOS / padding / special tokens) of consecutive sequences; a shard
always holds whole sequences, so a harvest can resume at the first sequence of the next shard.
Every file is written to a temporary name and renamed; each shard's byte count and sha256 are in
the manifest, so truncation and corruption are detected and reported with the file's name. The
manifest (and progress.json) carry `json_sha256`, the sha256 of their own canonical JSON without
that field, so an edited manifest is refused rather than trusted; its fields are also type- and
range-checked, and `verify` compares each shard's header with the manifest's rows and d_in.
Manifests written before the checksum existed are accepted with a warning (fields still checked).
A file's sha256 is computed once (while harvesting, or by the first run that reuses the cache);
`hashed.json` records its size and modification time then, and a run hashes it again only when
either has changed (`verify(rehash=True)` hashes every file regardless).

This module holds the format: file names, schema version, storage dtypes, the request fields that
identify a cache, the sealed-JSON checksum and the errors. Reading and checking a complete cache
is `rsae.data.cache_manifest`, writing one `rsae.data.cache_write` (the harvest itself is
`rsae.data.harvest`), row access to its shards `rsae.data.shards`.
"""

from __future__ import annotations

import hashlib
import json

import torch

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
EVAL_TOKENS = "eval_tokens.safetensors"
HASHED = "hashed.json"
SPLITS = ("train", "val")
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}

# Request fields that must match for a cache to be reused (name -> what to call it in errors).
IDENTITY_KEYS = ("model", "lm_dtype", "hook", "layer", "text", "context_size", "n_tokens", "val_fraction",
                 "storage_dtype", "prepend_bos", "exclude_special_tokens")


class CacheError(ValueError):
    """Base class for cache problems."""


class CacheMismatchError(CacheError):
    """The cache on disk was built for a different request."""


class CacheCorruptError(CacheError):
    """A cache file is missing, truncated or fails its checksum."""


class CacheWriteError(CacheError):
    """The cache cannot be written: no space left, a read-only or unwritable place, or a file
    where a directory should be."""


class NonFiniteActivationError(CacheError):
    """The model produced NaN/Inf activations; nothing is written."""


def storage_dtype(name: str) -> torch.dtype:
    try:
        return STORAGE_DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"storage_dtype must be bfloat16 or float32, got {name!r}") from None


def canonical_storage_dtype(name: str) -> str:
    return "bfloat16" if storage_dtype(name) == torch.bfloat16 else "float32"



CHECKSUM_KEY = "json_sha256"


def json_digest(obj: dict) -> str:
    """sha256 of the canonical JSON of `obj` without its own checksum field."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

