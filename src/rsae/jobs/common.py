"""What every job shares: the run directory, JSON outputs, failure handling, logger shutdown."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rsae.sae.base import ConfigError

log = logging.getLogger(__name__)

# Errors caused by the user's input: one clear line, no traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def run_guarded(job: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> dict[str, Any]:
    """Run `job`; on failure record it in `metrics.json` (status failed) so sweeps and reports
    see the failure. A single run then exits with one line; a multirun trial returns NaN so the
    other trials go on."""
    try:
        return job(cfg)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, then re-raised or reported
        cause = root_cause(exc)
        line = str(cause).splitlines()[0] if isinstance(cause, ConfigError) else f"{type(cause).__name__}: {cause}".splitlines()[0]
        try:
            write_json(output_dir() / "metrics.json", {"status": "failed", "error": line})
            (output_dir() / "error.log").write_text(traceback.format_exc())
        except Exception:  # noqa: BLE001 - never mask the original error
            pass
        if is_multirun():
            log.error("trial failed: %s", line)
            return {"status": "failed"}
        if isinstance(cause, USER_ERRORS):
            print(f"error: {line}", file=sys.stderr)
            raise SystemExit(1) from None
        raise


def root_cause(exc: BaseException) -> BaseException:
    """The user's error behind Hydra's InstantiationException wrappers."""
    while type(exc).__name__ == "InstantiationException" and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def finish_loggers(trainer) -> None:
    """Close W&B runs (one per trial in a multirun) and flush the others."""
    for logger in getattr(trainer, "loggers", []) or []:
        exp_finish = getattr(getattr(logger, "experiment", None), "finish", None)
        if type(logger).__name__ == "WandbLogger" and callable(exp_finish):
            exp_finish()
        else:
            try:
                logger.finalize("success")
            except Exception:  # noqa: BLE001
                pass
