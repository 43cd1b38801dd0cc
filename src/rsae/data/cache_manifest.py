"""Reading and checking a complete activation cache: `Manifest.load` reads `manifest.json`, refuses an
edited one (its sealed checksum), another schema version or any field of the wrong type or range
(one line naming the field); `Manifest.verify` checks every file's size (and sha256) and every
shard's header against the manifest; `check_request` compares the cache's identity with a run's
request; `load_eval_tokens` returns the held-out token ids. Every problem is a CacheError naming
the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from rsae.data.cache import (CHECKSUM_KEY, HASHED, IDENTITY_KEYS, MANIFEST, SCHEMA_VERSION, SPLITS, CacheCorruptError,
                             CacheError, CacheMismatchError, json_digest)
from rsae.data.cache_write import write_json_atomic

_REBUILD = "delete the cache directory to rebuild it"
VERIFY_THREADS = min(8, os.cpu_count() or 1)  # shards hashed at once when a cache is reused


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheCorruptError(f"cannot read {path}: {err}; {_REBUILD}") from None


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


def file_state(path: Path, sha256: str) -> list:
    """What `hashed.json` keeps of a file whose sha256 matched: that sha256, its size and mtime."""
    stat = path.stat()
    return [sha256, stat.st_size, stat.st_mtime_ns]


def read_hashed(root: Path) -> dict:
    """`hashed.json` of a cache: file name -> `file_state` when its sha256 last matched. Unreadable or
    absent means nothing is known to match (every file is hashed), never an error."""
    try:
        data = json.loads((root / HASHED).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def record_hashed(root: Path, states: dict) -> None:
    """Write `hashed.json`; a cache that cannot be written (read-only, shared) is hashed every time."""
    try:
        write_json_atomic(root / HASHED, states)
    except (OSError, CacheError):
        pass


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

    def files(self) -> list[dict]:
        """Every file entry of the cache (shards of each split, then the held-out tokens)."""
        return [shard for split in SPLITS for shard in self.shards(split)] + [self.data["eval_tokens"]]

    def record_hashed(self) -> None:
        """Note that every file's sha256 matches now (the harvest hashed the bytes it wrote)."""
        record_hashed(self.root, {f["file"]: file_state(self.root / f["file"], f["sha256"]) for f in self.files()})

    def verify(self, checksums: bool = True, threads: int | None = None, rehash: bool = False) -> None:
        """Every file present with its recorded size (and sha256 when `checksums`), and every
        shard's header agreeing with the manifest's rows, d_in and storage dtype. A file whose sha256
        matched before (`hashed.json`) and whose size and mtime have not changed since is not hashed
        again, unless `rehash`: a 20 GB cache reused by every run of a sweep costs its hashing once.
        Files are hashed by `threads` threads (default VERIFY_THREADS; hashlib and file reads release
        the GIL). The first bad file in manifest order is the one reported."""
        dtype = {"bfloat16": "BF16", "float32": "F32"}[self.storage_dtype]
        known = {} if rehash or not checksums else read_hashed(self.root)

        hashed: list[str] = []  # files hashed by this call (list.append is thread-safe)

        def needs_hash(entry: dict) -> bool:
            if not checksums:
                return False
            path = self.root / entry["file"]
            try:
                stale = known.get(entry["file"]) != file_state(path, entry["sha256"])
            except OSError:
                stale = True  # missing: verify_file names it
            if stale:
                hashed.append(entry["file"])
            return stale

        def check(shard: dict) -> None:
            path = self.root / shard["file"]
            verify_file(path, shard["bytes"], shard["sha256"] if needs_hash(shard) else None)
            got = shard_acts_info(path)
            if got != (dtype, [shard["rows"], self.d_in]):
                raise CacheCorruptError(
                    f"{self.root / MANIFEST}: says shard {shard['file']} holds {dtype} [{shard['rows']}, {self.d_in}] "
                    f"(rows, d_in) but it holds {got[0]} {got[1]}; {_REBUILD}")

        shards = self.files()[:-1]
        with ThreadPoolExecutor(max_workers=max(1, min(threads or VERIFY_THREADS, len(shards)))) as pool:
            futures = [pool.submit(check, shard) for shard in shards]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()  # stop hashing the rest: the cache is bad either way
                raise
        tokens = self.data["eval_tokens"]
        verify_file(self.root / tokens["file"], tokens["bytes"], tokens["sha256"] if needs_hash(tokens) else None)
        if hashed:  # a cache whose every file matched its record is left as it is (no write per run)
            self.record_hashed()

    def check_request(self, request: dict, d_in: int | None = None) -> None:
        problem = describe_mismatch(self.data["request"], request)
        if d_in is not None and int(d_in) != self.d_in:
            problem = "; ".join(filter(None, [problem, f"d_in: cache has {self.d_in}, requested {d_in}"]))
        if problem:
            raise CacheMismatchError(f"activation cache {self.root} does not match this run ({problem}); "
                                     "use another cache_dir or delete that one")



def load_eval_tokens(cache_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out token ids `[n_seq, ctx]` (int64) and keep-mask `[n_seq, ctx]` (bool)."""
    from safetensors.torch import load_file

    manifest = Manifest.load(cache_dir)
    path = manifest.root / manifest.data["eval_tokens"]["file"]
    verify_file(path, manifest.data["eval_tokens"]["bytes"], None)
    tensors = load_file(path)
    return tensors["input_ids"].long(), tensors["keep"].bool()
