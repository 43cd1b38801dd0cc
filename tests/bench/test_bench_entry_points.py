"""`python -m rsae.bench` lists the runnable benchmarks only (helpers are `_`-named), and the parts of
`train` run alone: `step` (raw steps, gate), `e2e`, `quality`. No timing assertions."""

from __future__ import annotations

import importlib
import json

import pytest

from rsae.bench import __main__ as cli

TINY = ["--device", "cpu", "--arch", "relu,rational", "--shapes", "8x64", "--batch", "32", "--variants", "fast",
        "--steps", "1", "--warmup", "1", "--repeats", "1", "--no-saelens", "--quality-steps", "2"]


def test_listed_benchmarks_are_runnable_modules():
    names = cli.available()
    assert {"train", "step", "e2e", "quality", "ddp", "data", "sparse"} <= set(names)
    assert not any(n.startswith("_") for n in names)
    assert all(callable(getattr(importlib.import_module(f"rsae.bench.{cli.ALIASES.get(n, n)}"), "main", None))
               for n in names if n not in cli.PARTS)
    assert set(cli.PARTS) <= set(names)


def test_step_runs_the_raw_steps_and_the_gate_only(tmp_path):
    out = tmp_path / "step.json"
    assert cli.main(["step", *TINY, "--quality", "relu", "--json", str(out)]) == 0
    kinds = [r["kind"] for r in json.loads(out.read_text())["runs"]]
    assert set(kinds) == {"rsae", "gate"}, kinds


def test_quality_runs_the_quality_check_only(tmp_path):
    out = tmp_path / "quality.json"
    assert cli.main(["quality", *TINY, "--quality", "relu", "--json", str(out)]) == 0
    assert [r["kind"] for r in json.loads(out.read_text())["runs"]] == ["quality"]


def test_a_part_without_its_architectures_is_a_one_line_error():
    with pytest.raises(SystemExit, match="--e2e: name the architectures"):
        cli.main(["e2e", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--quality: name the architectures"):
        cli.main(["quality", "--device", "cpu"])
