"""Writing the activation cache safely: every file goes to a temporary name, is fsynced and renamed
(`write_atomic`), so readers never see a partial file; JSON files are sealed with their own
checksum; shards are written with their size and sha256 for the manifest, which is written last
(its presence marks the cache complete); an exclusive lock (`cache_lock`) keeps concurrent runs
from building the same cache at once; and every OS failure (disk full, read-only, a file in the
way) becomes one CacheWriteError line that names the path and what to do. The format these
files follow is described in `rsae.data.cache`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from rsae.data.cache import CHECKSUM_KEY, MANIFEST, CacheWriteError, NonFiniteActivationError, json_digest


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


def write_sealed_json(path: Path, obj: dict) -> dict:
    """Write `obj` with its checksum (see `read_sealed_json`); returns what was written."""
    sealed = {**obj, CHECKSUM_KEY: json_digest(obj)}
    write_json_atomic(path, sealed)
    return sealed


def write_manifest(root: Path, manifest: dict) -> dict:
    """Write the manifest last: its presence marks the cache complete."""
    return write_sealed_json(Path(root) / MANIFEST, manifest)


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

