"""Benchmarks: `python -m rsae.bench <name> [args]` runs `rsae.bench.<name>.main(args)`.

`python -m rsae.bench <name> --help` shows a benchmark's options.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import rsae.bench

# Benchmark names that differ from their module's name.
ALIASES = {"default": "default_job"}
# Parts of `train` that also run alone: `python -m rsae.bench step` is `train` with only that part
# (the part's module holds the measurement, `train` the shared options, loop and report).
PARTS = ("step", "e2e", "quality")


def available() -> list[str]:
    modules = {m.name for m in pkgutil.iter_modules(rsae.bench.__path__) if not m.name.startswith("_")}
    return sorted((modules - set(ALIASES.values())) | set(ALIASES))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(f"usage: python -m rsae.bench {{{','.join(names)}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] in PARTS:
        from rsae.bench import train

        doc = importlib.import_module(f"rsae.bench.{argv[0]}").__doc__
        return train.main(argv[1:], parts=(argv[0],), prog=f"python -m rsae.bench {argv[0]}", description=doc) or 0
    module = ALIASES.get(argv[0], argv[0])
    return importlib.import_module(f"rsae.bench.{module}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
