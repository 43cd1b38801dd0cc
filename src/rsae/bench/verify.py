"""How long a run takes to verify a reused activation cache (every shard's size, header and sha256),
with one hashing thread against several, and (row "recorded") what a later run pays once every
file's hash is recorded in hashed.json: sizes, modification times and headers only.

    python -m rsae.bench verify .cache/rsae/<model>/<hook>.<layer>-... --threads 1 8 --repeats 3

Each repeat times every thread count once, in turn, so the page cache treats them alike (the first
repeat may read from disk; the later ones mostly from memory).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rsae.data.cache_manifest import VERIFY_THREADS, Manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rsae.bench verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache_dir", type=Path, help="a finished activation cache (the directory holding manifest.json)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, VERIFY_THREADS])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    if any(n < 1 for n in a.threads) or a.repeats < 1:
        p.error("--threads and --repeats must be at least 1")
    manifest = Manifest.load(a.cache_dir)
    files = [s for split in ("train", "val") for s in manifest.shards(split)]
    gb = sum(s["bytes"] for s in files) / 1e9
    seconds: dict[int | str, list[float]] = {n: [] for n in a.threads}
    for _ in range(a.repeats):
        for n in a.threads:
            start = time.perf_counter()
            manifest.verify(checksums=True, threads=n, rehash=True)
            seconds[n].append(time.perf_counter() - start)
        start = time.perf_counter()
        manifest.verify(checksums=True)  # every file's state was just recorded: nothing is hashed
        seconds.setdefault("recorded", []).append(time.perf_counter() - start)
    result = {"cache": str(a.cache_dir), "shards": len(files), "gb": round(gb, 3),
              "seconds": {n: [round(t, 3) for t in ts] for n, ts in seconds.items()},
              "best_gb_per_s": {n: round(gb / min(ts), 2) for n, ts in seconds.items()}}
    print(f"{len(files)} shards, {gb:.2f} GB")
    print("| threads | seconds (each repeat) | best GB/s |\n|---|---|---|")
    for n, ts in seconds.items():
        print(f"| {n} | {' / '.join(f'{t:.2f}' for t in ts)} | {gb / min(ts):.2f} |")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0
