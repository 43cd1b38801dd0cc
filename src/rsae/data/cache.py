"""The activation cache: a directory with `manifest.json` and safetensors shards per split.

Layout::

    <cache_dir>/manifest.json            written last, atomically: the cache is complete
    <cache_dir>/progress.json            while harvesting: the request and the shards done so far
    <cache_dir>/train/00000.safetensors  "acts" [n, d_in] (bf16 or fp32), "tokens" [n] int32,
                                         "seq" [n] int32 (sequence index), "pos" [n] int32
    <cache_dir>/val/00000.safetensors    same, held-out sequences
    <cache_dir>/eval_tokens.safetensors  "input_ids" [n_val_seq, ctx] int64, "keep" [.., ..] bool

Rows are the kept positions (no BOS / padding / special tokens) of consecutive sequences; a shard
always holds whole sequences, so a harvest can resume at the first sequence of the next shard.
Every file is written to a temporary name and renamed; each shard's byte count and sha256 are in
the manifest, so truncation and corruption are detected and reported with the file's name. The
manifest (and progress.json) carry `json_sha256`, the sha256 of their own canonical JSON without
that field, so an edited manifest is refused rather than trusted; its fields are also type- and
range-checked, and `verify` compares each shard's header with the manifest's rows and d_in.
Manifests written before the checksum existed are accepted with a warning (fields still checked).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import struct
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
EVAL_TOKENS = "eval_tokens.safetensors"
SPLITS = ("train", "val")
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
_NUMPY_VIEW = {"BF16": (np.uint16, torch.bfloat16), "F32": (np.float32, torch.float32)}

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


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_error(path: Path, err: OSError) -> CacheWriteError:
    """One line naming `path` and what the system said, with what to do about it."""
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        return CacheWriteError(f"cannot write {path}: {blocker} is a file, not a directory; "
                               "choose another cache_dir (or cache_root)")
    if err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        hint = "free some space and run again: the harvest resumes from the last complete shard"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "choose a writable cache_dir (or cache_root)"
    else:
        hint = "fix it and run again: the harvest resumes from the last complete shard"
    return CacheWriteError(f"cannot write {path}: {err.strerror or err}; {hint}")


def make_dirs(*paths: Path) -> None:
    for path in paths:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(path, err) from None


def _write_all(handle, data: bytes) -> None:
    handle.write(data)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to `<path>.tmp`, fsync, then rename: readers never see a partial file. On failure
    (disk full, read-only) the temporary file is removed and a CacheWriteError names `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            _write_all(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, err) from None


def write_json_atomic(path: Path, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


CHECKSUM_KEY = "json_sha256"


def json_digest(obj: dict) -> str:
    """sha256 of the canonical JSON of `obj` without its own checksum field."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_sealed_json(path: Path, obj: dict) -> dict:
    """Write `obj` with its checksum (see `read_sealed_json`); returns what was written."""
    sealed = {**obj, CHECKSUM_KEY: json_digest(obj)}
    write_json_atomic(path, sealed)
    return sealed


def write_manifest(root: Path, manifest: dict) -> dict:
    """Write the manifest last: its presence marks the cache complete."""
    return write_sealed_json(Path(root) / MANIFEST, manifest)


def read_sealed_json(path: Path) -> dict:
    """A JSON object written by `write_sealed_json`; an edited one is a CacheCorruptError. One
    written before checksums existed is accepted with a warning."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CacheCorruptError(f"{path}: must hold a JSON object; {_REBUILD}")
    stored = data.get(CHECKSUM_KEY)
    if stored is None:
        warnings.warn(f"{path} has no checksum (written by an older rsae): edits to it cannot be detected; "
                      "delete the cache to rebuild it with one", stacklevel=3)
    elif stored != json_digest(data):
        raise CacheCorruptError(f"{path}: was edited (checksum mismatch); delete the cache to rebuild it")
    return data


@contextlib.contextmanager
def cache_lock(root: Path):
    """Exclusive lock on a cache directory while it is being built: concurrent runs (DDP ranks,
    parallel sweep trials) sharing a cache wait, then find it complete instead of racing."""
    make_dirs(root)
    try:
        handle = open(root / ".lock", "w")
    except OSError as err:
        raise write_error(root / ".lock", err) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[rsae] waiting for another process building the activation cache {root}", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_REBUILD = "delete the cache directory to rebuild it"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheCorruptError(f"cannot read {path}: {err}; {_REBUILD}") from None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """Write a safetensors file atomically; returns its size and sha256."""
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()})
    write_atomic(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """Write one shard (`acts` plus per-row metadata); returns its manifest entry minus the file name."""
    return {"rows": int(tensors["acts"].shape[0]), **write_tensors(path, tensors)}


def check_finite(acts: torch.Tensor, where: str) -> None:
    if not torch.isfinite(acts).all():
        bad = (~torch.isfinite(acts)).sum().item()
        raise NonFiniteActivationError(f"{bad} NaN/Inf activation values in {where}; refusing to write them to the cache")


def verify_file(path: Path, expected_bytes: int, expected_sha256: str | None) -> None:
    """Raise CacheCorruptError naming `path` if it is missing, has the wrong size, or wrong hash."""
    hint = "delete the cache directory to rebuild it"
    if not path.is_file():
        raise CacheCorruptError(f"cache file missing: {path}; {hint}")
    size = path.stat().st_size
    if size != expected_bytes:
        raise CacheCorruptError(f"cache file {path} is truncated or altered: {size} bytes, manifest says {expected_bytes}; {hint}")
    if expected_sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        if digest.hexdigest() != expected_sha256:
            raise CacheCorruptError(f"cache file {path} fails its sha256 checksum; {hint}")


def describe_mismatch(cached: dict, requested: dict) -> str | None:
    """One-line description of identity fields that differ, or None when the cache fits."""
    diffs = []
    for key in IDENTITY_KEYS:
        if cached.get(key) != requested.get(key):
            diffs.append(f"{key}: cache has {_short(cached.get(key))}, requested {_short(requested.get(key))}")
    return "; ".join(diffs) or None


def _short(value) -> str:
    if isinstance(value, dict):
        value = {k: (v[:12] if k == "sha256" and isinstance(v, str) else v) for k, v in value.items() if k != "files"}
    return json.dumps(value, sort_keys=True)


def _is_int(value, lo: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def _check_file_entry(entry, where: str, path: Path, rows: bool) -> None:
    """A manifest entry naming a file inside the cache with its size and sha256 (and rows)."""
    problem = None
    if not isinstance(entry, dict):
        problem = "must be an object"
    elif not isinstance(entry.get("file"), str) or not entry["file"] or Path(entry["file"]).is_absolute() \
            or ".." in Path(entry["file"]).parts:
        problem = f"file must be a relative path inside the cache, got {json.dumps(entry.get('file'))}"
    elif not _is_int(entry.get("bytes")):
        problem = f"bytes must be an integer >= 0, got {json.dumps(entry.get('bytes'))}"
    elif not (isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
        problem = "sha256 must be 64 hex digits"
    elif rows and not _is_int(entry.get("rows")):
        problem = f"rows must be an integer >= 0, got {json.dumps(entry.get('rows'))}"
    if problem:
        raise CacheCorruptError(f"{path}: {where}: {problem}; {_REBUILD}")


def check_manifest_fields(data: dict, path: Path) -> None:
    """Types and ranges of every manifest field the readers use; one line naming the field."""
    def bad(field: str, what: str, value) -> CacheCorruptError:
        return CacheCorruptError(f"{path}: {field} must be {what}, got {json.dumps(value)[:80]}; {_REBUILD}")

    if not _is_int(data.get("d_in"), 1):
        raise bad("d_in", "an integer >= 1", data.get("d_in"))
    request = data.get("request")
    if not isinstance(request, dict):
        raise bad("request", "an object", request)
    if request.get("storage_dtype") not in ("bfloat16", "float32"):
        raise bad("request.storage_dtype", '"bfloat16" or "float32"', request.get("storage_dtype"))
    splits = data.get("splits")
    if not isinstance(splits, dict):
        raise bad("splits", "an object", splits)
    for split in SPLITS:
        entry = splits.get(split)
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            raise bad(f"splits.{split}", "an object with a list of shards", entry)
        for i, shard in enumerate(entry["shards"]):
            _check_file_entry(shard, f"splits.{split}.shards[{i}]", path, rows=True)
        total = sum(s["rows"] for s in entry["shards"])
        if entry.get("rows") != total:
            raise bad(f"splits.{split}.rows", f"the sum of its shards' rows ({total})", entry.get("rows"))
    if splits["train"]["rows"] == 0:
        raise bad("splits.train.rows", "> 0", 0)
    _check_file_entry(data.get("eval_tokens"), "eval_tokens", path, rows=False)
    stats = data.get("stats")
    mean_norm = stats.get("mean_norm") if isinstance(stats, dict) else None
    if isinstance(mean_norm, bool) or not isinstance(mean_norm, (int, float)) or not math.isfinite(mean_norm) \
            or mean_norm <= 0:
        raise bad("stats.mean_norm", "a finite number > 0", mean_norm)


def shard_acts_info(path: Path) -> tuple[str, list]:
    """(dtype, shape) of a shard's `acts` from its safetensors header, without mapping the data."""
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > min(path.stat().st_size, 1 << 24):
                raise ValueError(f"header length {header_len} is impossible")
            info = json.loads(handle.read(header_len))["acts"]
        return info["dtype"], list(info["shape"])
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise CacheCorruptError(f"cannot read shard {path}: {err}; {_REBUILD}") from None


@dataclass
class Manifest:
    """The parsed `manifest.json` of a complete cache."""

    root: Path
    data: dict

    @classmethod
    def load(cls, cache_dir: str | Path) -> "Manifest":
        root = Path(cache_dir)
        path = root / MANIFEST
        if not path.is_file():
            raise CacheError(f"no complete activation cache at {root} (missing {MANIFEST})")
        data = read_sealed_json(path)
        if data.get("schema_version") != SCHEMA_VERSION:
            raise CacheMismatchError(f"cache {root} has schema version {data.get('schema_version')}, "
                                     f"this code reads {SCHEMA_VERSION}; rebuild it")
        check_manifest_fields(data, path)
        return cls(root, data)

    @property
    def d_in(self) -> int:
        return int(self.data["d_in"])

    @property
    def mean_norm(self) -> float:
        """Mean L2 norm of the training rows (checked finite and > 0 on load)."""
        return float(self.data["stats"]["mean_norm"])

    @property
    def storage_dtype(self) -> str:
        return self.data["request"]["storage_dtype"]

    def shards(self, split: str) -> list[dict]:
        return self.data["splits"][split]["shards"]

    def rows(self, split: str) -> int:
        return sum(s["rows"] for s in self.shards(split))

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / s["file"] for s in self.shards(split)]

    def verify(self, checksums: bool = True) -> None:
        """Every file present with its recorded size (and sha256 when `checksums`), and every
        shard's header agreeing with the manifest's rows, d_in and storage dtype."""
        dtype = {"bfloat16": "BF16", "float32": "F32"}[self.storage_dtype]
        for split in SPLITS:
            for shard in self.shards(split):
                path = self.root / shard["file"]
                verify_file(path, shard["bytes"], shard["sha256"] if checksums else None)
                got = shard_acts_info(path)
                if got != (dtype, [shard["rows"], self.d_in]):
                    raise CacheCorruptError(
                        f"{self.root / MANIFEST}: says shard {shard['file']} holds {dtype} [{shard['rows']}, {self.d_in}] "
                        f"(rows, d_in) but it holds {got[0]} {got[1]}; {_REBUILD}")
        tokens = self.data["eval_tokens"]
        verify_file(self.root / tokens["file"], tokens["bytes"], tokens["sha256"] if checksums else None)

    def check_request(self, request: dict, d_in: int | None = None) -> None:
        problem = describe_mismatch(self.data["request"], request)
        if d_in is not None and int(d_in) != self.d_in:
            problem = "; ".join(filter(None, [problem, f"d_in: cache has {self.d_in}, requested {d_in}"]))
        if problem:
            raise CacheMismatchError(f"activation cache {self.root} does not match this run ({problem}); "
                                     "use another cache_dir or delete that one")


class ShardReader:
    """Row access to one safetensors shard: zero-copy views through a memory map, or plain reads
    into a caller's buffer (`read_into`, which releases the GIL while the kernel copies)."""

    def __init__(self, path: str | Path, rows: int | None = None):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
            info = header["acts"]
            np_dtype, self.torch_dtype = _NUMPY_VIEW[info["dtype"]]
            n, d = info["shape"]
            start = 8 + header_len + info["data_offsets"][0]
            # copy-on-write mapping: reads come from the page cache, torch gets a writable array
            # (no warning), and nothing can ever be written back to the file
            self.array = np.memmap(self.path, dtype=np_dtype, mode="c", offset=start, shape=(n, d))
            self._data_offset, self._row_bytes = start, d * np.dtype(np_dtype).itemsize
            self._fd = os.open(self.path, os.O_RDONLY)
        except (OSError, ValueError, KeyError, struct.error) as err:
            raise CacheCorruptError(f"cannot read shard {self.path}: {err}; delete the cache directory to rebuild it") from None
        if rows is not None and n != rows:
            raise CacheCorruptError(f"shard {self.path} has {n} rows, manifest says {rows}")
        self.rows, self.d = n, d

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Read rows [start, stop) into the C-contiguous array `out` (same itemsize as storage)."""
        view = memoryview(out).cast("B")
        offset, done, total = self._data_offset + start * self._row_bytes, 0, (stop - start) * self._row_bytes
        while done < total:
            got = os.preadv(self._fd, [view[done:total]], offset + done)
            if got <= 0:
                raise CacheCorruptError(f"shard {self.path} ended early (truncated?); delete the cache directory to rebuild it")
            done += got

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def view(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) in the storage dtype, without copying (valid while the reader lives)."""
        return torch.from_numpy(self.array[start:stop]).view(self.torch_dtype)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a new tensor in the storage dtype."""
        return self.view(start, stop).clone()


def load_eval_tokens(cache_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out token ids `[n_seq, ctx]` (int64) and keep-mask `[n_seq, ctx]` (bool)."""
    from safetensors.torch import load_file

    manifest = Manifest.load(cache_dir)
    path = manifest.root / manifest.data["eval_tokens"]["file"]
    verify_file(path, manifest.data["eval_tokens"]["bytes"], None)
    tensors = load_file(path)
    return tensors["input_ids"].long(), tensors["keep"].bool()
