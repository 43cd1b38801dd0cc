"""Find run directories and read what they wrote.

A run directory is a directory holding `metrics.json` (train runs), `eval.json` (evaluate
runs), `upgrade.json` (upgrade runs) or a `.hydra/` folder (any Hydra job; one with none of the
JSON files crashed before writing them, or is still running, and counts as failed). Given
directories are searched recursively, so a Hydra multirun sweep directory yields its numbered
trials; outputs inside a run (`sae/`, `checkpoints/`, `wandb/`, `csv/`) are not searched.

Metric names are canonical: training's `val/mse` is read as `mse`, like eval.json's keys.

Status: `ok`, `interrupted` (metrics.json says so: a signal stopped it; `error` holds the resume
command) or `failed` (metrics.json says so, no result file, or a reconstruction metric that is not
a finite number: NaN in a file written before metrics were strict JSON, or null).
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

RESULT_FILES = ("metrics.json", "eval.json", "upgrade.json")
SKIP_DIRS = {".hydra", "wandb", "checkpoints", "csv", "sae", "__pycache__", ".git", "tensorboard", "lightning_logs"}
# Stages of an upgrade run, in table order, with their column labels.
STAGES = {"teacher": "teacher", "rsae_init": "RSAE-init", "rsae": "RSAE", "teacher_ft": "teacher-FT"}
ARCH_ALIASES = {"standard": "relu"}
COUNT_KEYS = {"n_tokens", "n_sequences", "n_scored", "n_spliced", "n_rows"}
# A result whose reconstruction is not a finite number did not work, whatever its status says.
FINITE_KEYS = ("mse", "fvu", "val/mse", "val/fvu")


@dataclass
class Run:
    path: Path
    kind: str  # train | evaluate | upgrade | <task_name> | unknown
    status: str  # ok | interrupted | failed
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # upgrade runs
    architecture: str = "?"
    overrides: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # model, teacher, gate, l0_counting, ...
    name: str = ""  # display name (path relative to the common root)


def expand(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Paths with shell globs expanded; a missing path is an error."""
    out: list[Path] = []
    for raw in paths:
        text = os.path.expanduser(str(raw))
        if any(c in text for c in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no path matches {raw!r}")
            out.extend(Path(m) for m in matches)
        else:
            path = Path(text)
            if not path.exists():
                raise FileNotFoundError(f"no such run directory: {raw}")
            out.append(path)
    return out


def is_run_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in RESULT_FILES) or (path / ".hydra").is_dir()


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories at or below `paths` (globs allowed), sorted naturally, without duplicates."""
    found: dict[Path, None] = {}
    for root in expand(paths):
        if root.is_file():
            root = root.parent
        for dirpath, dirnames, _ in os.walk(root, followlinks=False):
            here = Path(dirpath)
            if is_run_dir(here):
                found[here.resolve()] = None
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not _is_sae_dir(here / d))
    return sorted(found, key=_natural_key)


def _is_sae_dir(path: Path) -> bool:
    return (path / "cfg.json").is_file() and (path / "sae_weights.safetensors").is_file()


def _natural_key(path: Path):
    return [int(p) if p.isdigit() else p for p in path.parts]


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> Any:
    """The YAML as plain data, interpolations resolved where they can be outside the run (`${job}`,
    `${rsae.upgrading:...}`); one that cannot (`${hydra:...}`, `???`) reads as None."""
    if not path.is_file():
        return None
    try:
        from omegaconf import OmegaConf

        import rsae.config  # noqa: F401  (the resolvers the configs use)

        cfg = OmegaConf.load(path)
        return _plain(cfg) if OmegaConf.is_dict(cfg) else OmegaConf.to_container(cfg, resolve=False)
    except Exception:  # noqa: BLE001 - a broken config only loses the label
        return None


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    def child(key: Any) -> Any:
        try:
            return _plain(node[key])
        except Exception:  # noqa: BLE001 - an interpolation only the run could resolve
            return None

    if OmegaConf.is_dict(node):
        return {key: child(key) for key in node}
    if OmegaConf.is_list(node):
        return [child(i) for i in range(len(node))]
    return node


def canonical(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric entries with `val/` prefixes dropped (`val/mse` -> `mse`)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key.removeprefix("val/")] = float(value)
    return out


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _short_name(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).rstrip("/")
    return text.split("/")[-1].removesuffix(".gguf") or text


def architecture_of(cfg: Any, choices: dict, fallback: str | None = None) -> str:
    """`sae=` choice, else the `_target_` class name, else `fallback`; with the gate when set."""
    arch = choices.get("sae") if isinstance(choices, dict) else None
    target = _get(cfg, "sae._target_")
    if arch is None and target:
        arch = str(target).rsplit(".", 1)[-1].removesuffix("SAE").lower() or str(target)
    arch = arch or fallback or "?"
    arch = ARCH_ALIASES.get(arch, arch)
    gate = _get(cfg, "sae.gate")
    if isinstance(gate, str) and gate not in ("", "none"):
        arch = f"{arch} (gate={gate})"
    return arch


def read_run(path: Path) -> Run:
    path = Path(path)
    cfg = _read_yaml(path / ".hydra" / "config.yaml") or {}
    hydra_cfg = _read_yaml(path / ".hydra" / "hydra.yaml") or {}
    choices = _get(hydra_cfg, "hydra.runtime.choices") or {}
    overrides = _read_yaml(path / ".hydra" / "overrides.yaml") or []
    overrides = [str(o) for o in overrides if not str(o).startswith(("hydra.", "+hydra.", "++hydra."))]
    files = {name: path / name for name in RESULT_FILES if (path / name).is_file()}
    data = {name: _read_json(p) for name, p in files.items()}
    task = _get(cfg, "task_name")
    kind = task or ("upgrade" if "upgrade.json" in files else "evaluate" if "eval.json" in files else
                    "train" if "metrics.json" in files else "unknown")
    run = Run(path=path, kind=str(kind), status="ok", overrides=overrides)
    run.info["model"] = _short_name(_get(cfg, "lm.name_or_path")) or (
        "synthetic" if "synthetic" in str(_get(cfg, "data._target_") or "") else None)

    # The newest result file decides the status (a failed re-run in the same directory wins).
    newest = max(files, key=lambda n: files[n].stat().st_mtime) if files else None
    failed = data.get("metrics.json")
    if not files:
        run.status, run.error = "failed", "no metrics written (crashed, killed or still running)"
    elif failed is not None and failed.get("status") == "failed" and newest == "metrics.json":
        run.status, run.error = "failed", str(failed.get("error", "failed"))
    elif failed is not None and failed.get("status") == "interrupted" and newest == "metrics.json":
        at = f" at step {failed['step']}" if failed.get("step") is not None else ""
        run.status, run.error = "interrupted", f"interrupted by {failed.get('signal', 'a signal')}{at}; resume: {failed.get('resume', '?')}"
    elif any(v is None for v in data.values()) and all(v is None for v in data.values()):
        run.status, run.error = "failed", f"unreadable {', '.join(files)}"

    if "upgrade.json" in files and data["upgrade.json"] is not None:
        _read_upgrade(run, data["upgrade.json"], cfg)
        run.kind = "upgrade"
    elif "eval.json" in files and data["eval.json"] is not None:
        ev = data["eval.json"]
        if run.status == "ok" and ev.get("status", "ok") == "failed":
            run.status, run.error = "failed", str(ev.get("error", "failed"))
        run.metrics = canonical(ev)
        info = ev.get("info") or {}
        run.architecture = ARCH_ALIASES.get(str(info.get("architecture")), info.get("architecture") or "?")
        run.info["model"] = _short_name(info.get("model")) or run.info["model"]
        run.info["sae_path"] = info.get("sae_path")
        if task is None:
            run.kind = "evaluate"
    else:
        m = data.get("metrics.json") or {}
        if run.status == "ok":
            run.metrics = canonical(m)
        run.architecture = architecture_of(cfg, choices)
    if run.architecture == "?":
        run.architecture = architecture_of(cfg, choices)
    if run.status == "ok":
        bad = [f"{stage}/{k}" if stage else k for stage, d in _result_dicts(data) for k in FINITE_KEYS if k in d and not _finite(d[k])]
        if bad:
            run.status, run.error = "failed", f"not a finite number: {', '.join(bad)}"
            run.metrics = {}
    return run


def _result_dicts(data: dict[str, dict | None]) -> Iterable[tuple[str, dict]]:
    """(stage, values) of every result in the run's files (upgrade stages by name)."""
    for name, d in data.items():
        if not isinstance(d, dict):
            continue
        if name == "upgrade.json":
            yield from ((stage, v) for stage, v in d.items() if stage != "settings" and isinstance(v, dict))
        else:
            yield "", d


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_upgrade(run: Run, up: dict, cfg: Any) -> None:
    for stage in STAGES:
        if isinstance(up.get(stage), dict):
            run.stages[stage] = canonical(up[stage])
    for stage, values in up.items():  # stages we do not know by name still show up
        if stage not in STAGES and stage != "settings" and isinstance(values, dict) and any(k in values for k in ("mse", "fvu", "l0")):
            run.stages[stage] = canonical(values)
    if run.status == "ok" and up.get("status") == "failed":
        run.status, run.error = "failed", str(up.get("error", "failed"))
    # rsae.jobs.upgrade keeps run facts under "settings" (teacher_architecture, gate, l0_counting, ...).
    # The teacher's architecture names its family (matryoshka); its mechanism (batchtopk) is the
    # fallback for runs that did not record the architecture.
    settings = up.get("settings") if isinstance(up.get("settings"), dict) else {}
    teacher = up.get("teacher") if isinstance(up.get("teacher"), dict) else {}
    teacher_arch = (settings.get("teacher_architecture") or settings.get("teacher_mechanism")
                    or up.get("teacher_architecture") or teacher.get("architecture")
                    or _get(cfg, "teacher.architecture") or _short_name(settings.get("teacher_path"))
                    or _short_name(_get(cfg, "teacher.path")))
    run.info["teacher"] = ARCH_ALIASES.get(str(teacher_arch), teacher_arch)
    run.info["model"] = up.get("model") or run.info.get("model")
    for key in ("gate", "l0_counting"):
        value = settings.get(key, up.get(key))
        if value is None and key == "gate":
            value = _get(cfg, "sae.gate") if _get(cfg, "sae.gate") != "teacher" else None
            value = value or _get(cfg, "upgrade.gate")  # runs from before the gate settings moved to sae.*
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        if value is not None:
            run.info[key] = str(value)
    run.architecture = f"rsae from {run.info['teacher']}" if run.info.get("teacher") else "rsae"
    run.metrics = dict(run.stages.get("rsae", {}))


def collect(paths: Iterable[str | os.PathLike]) -> list[Run]:
    dirs = find_run_dirs(paths)
    runs = [read_run(d) for d in dirs]
    if runs:
        common = Path(os.path.commonpath([str(r.path) for r in runs]))
        if len(runs) == 1:
            common = common.parent
        for r in runs:
            r.name = str(r.path.relative_to(common)) if r.path != common else r.path.name
    return runs
