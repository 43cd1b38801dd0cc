"""What every job shares: the run directory, JSON outputs, failure and signal handling, logger shutdown.

Exit codes of `train.py` / `evaluate.py` (also written to `metrics.json` as `status`):
  0    ok
  1    failed: bad input or a diverged run (one line `error: ...` on stderr), or a crash
       (traceback; the traceback is also in `error.log`); `status: failed`
  130  interrupted by SIGINT (Ctrl-C), 143 interrupted by SIGTERM (128 + the signal's number, as
       a shell reports a process killed by it): `status: interrupted`, with the checkpoint saved
       at the step reached and the command that resumes the run.
A signal during training stops the run at the end of the current step (Lightning's own SIGTERM
flag, which DDP ranks agree on), saves a checkpoint there and exits; a second Ctrl-C stops at
once. Outside training (data preparation, evaluation) a signal stops at once.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from rsae import jsonfile
from rsae.errors import ConfigError, NonFiniteError

log = logging.getLogger(__name__)

# Errors caused by the user's input or by the run diverging: one clear line, no traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, NonFiniteError)
EXIT_FAILED = 1


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Strict JSON (non-finite numbers as null), written atomically."""
    jsonfile.write_json(path, data)


# --- signals ----------------------------------------------------------------------------------
class Interrupted(BaseException):
    """A signal that stops the job at once (outside training, or a second Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _SignalState:
    received: int | None = None  # the first SIGTERM / SIGINT of this job
    stop_fit: Callable[[], None] | None = None  # asks the trainer in `fit` to stop after its step
    checkpoint: Path | None = None  # saved on the interrupt, with the step it holds
    step: int | None = None


_STATE = _SignalState()


def _on_signal(signum: int, frame) -> None:
    first = _STATE.received is None
    if first:
        _STATE.received = signum
    if _STATE.stop_fit is not None and (first or signum == signal.SIGTERM):
        log.warning("%s: stopping after the current step (a checkpoint is saved)%s", signal.Signals(signum).name,
                    "; Ctrl-C again stops at once" if signum == signal.SIGINT else "")
        _STATE.stop_fit()
        return
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    _STATE.received, _STATE.stop_fit, _STATE.checkpoint, _STATE.step = None, None, None, None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


@contextmanager
def stop_after_step_on_signal(trainer: L.Trainer) -> Iterator[None]:
    """While `trainer` fits, SIGTERM and a first SIGINT stop it at the end of the current step
    (Lightning then raises SIGTERMException there; `CheckpointOnInterrupt` saves the checkpoint)."""
    def stop() -> None:
        trainer._signal_connector.received_sigterm = True  # Lightning's own per-step flag

    _STATE.stop_fit = stop
    if _STATE.received is not None:  # a signal came before the fit began
        stop()
    try:
        yield
    finally:
        _STATE.stop_fit = None


class CheckpointOnInterrupt(L.Callback):
    """Save a checkpoint when a signal stops the fit at the end of a step (before the trainer
    tears down), so that a resumed run continues from that step."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        _STATE.checkpoint, _STATE.step = self.path, int(trainer.global_step)
        log.info("saved %s at step %d", self.path, trainer.global_step)


def rerun_command(*settings: str) -> str:
    """This process's command line with `settings` (key=value) replacing any given for the same keys."""
    keys = {s.split("=", 1)[0].lstrip("+~") for s in settings}
    args = [a for a in sys.argv[1:] if a.split("=", 1)[0].lstrip("+~") not in keys]
    return shlex.join(["python", sys.argv[0], *args, *settings])


# --- the guard --------------------------------------------------------------------------------
def run_guarded(job: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig,
                resume: Callable[[Path | None], str] | None = None) -> dict[str, Any]:
    """Run `job`; record its end in `metrics.json` so sweeps and reports see it.

    A failure is `status: failed`: a single run then exits with one line (code 1), a multirun
    trial returns `{"status": "failed"}` so the other trials go on. A signal is `status:
    interrupted`, with `resume(checkpoint)`'s command, and exits 128 + the signal's number."""
    install_signal_handlers()
    try:
        return job(cfg)
    except (Interrupted, SIGTERMException) as exc:
        signum = getattr(exc, "signum", None) or _STATE.received or signal.SIGTERM
        _record_interrupt(signum, resume)
        raise SystemExit(128 + signum) from None
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, then re-raised or reported
        cause = root_cause(exc)
        one_line = isinstance(cause, (ConfigError, NonFiniteError))
        line = (str(cause) if one_line else f"{type(cause).__name__}: {cause}").splitlines()[0]
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
            raise SystemExit(EXIT_FAILED) from None
        raise


def _record_interrupt(signum: int, resume: Callable[[Path | None], str] | None) -> None:
    name = signal.Signals(signum).name
    record: dict[str, Any] = {"status": "interrupted", "signal": name}
    if _STATE.checkpoint is not None:
        record.update({"step": _STATE.step, "checkpoint": str(_STATE.checkpoint.resolve())})
    try:
        command = resume(_STATE.checkpoint) if resume is not None else rerun_command()
        record["resume"] = command
        write_json(output_dir() / "metrics.json", record)
    except Exception as err:  # noqa: BLE001 - still exit with the signal's code
        command = f"(could not write metrics.json: {err})"
    where = f" at step {_STATE.step}, checkpoint {_STATE.checkpoint}" if _STATE.checkpoint is not None else ""
    print(f"interrupted by {name}{where}; resume with: {command}", file=sys.stderr)


def root_cause(exc: BaseException) -> BaseException:
    """The user's error behind Hydra's InstantiationException wrappers."""
    while type(exc).__name__ == "InstantiationException" and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


# --- checkpoints ------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint read safely (`weights_only`: no arbitrary objects are unpickled;
    memory-mapped: the tensors are not read), or one line saying why it is not one."""
    import zipfile

    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ckpt_path does not exist: {path}")
    if not zipfile.is_zipfile(p):
        raise ConfigError(f"ckpt_path {path} is not a complete PyTorch checkpoint (no zip archive: truncated, or another "
                          "kind of file; give a .ckpt file that training wrote, e.g. <run>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - truncated, corrupt, or holding objects a safe load refuses
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"ckpt_path {path} cannot be read safely as a checkpoint (truncated or corrupt?): "
                          f"{type(err).__name__}: {reason[:200]}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "loops" not in ckpt:
        raise ConfigError(f"ckpt_path {path} is not a training checkpoint (no state_dict / loop state; give "
                          "<run>/checkpoints/last.ckpt or step*.ckpt)")
    return ckpt


def check_checkpoint_fits(ckpt: dict, module, path: str | os.PathLike) -> None:
    """One line when the checkpoint's weights do not match the module built from the config."""
    own, saved = module.state_dict(), ckpt["state_dict"]
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        raise ConfigError(f"ckpt_path {path} holds another model: missing {missing[:4]}, unexpected {unexpected[:4]} "
                          "(resume with the sae settings of the run that wrote it)")
    for key, tensor in own.items():
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise ConfigError(f"ckpt_path {path} does not fit this SAE: {key} is {list(saved[key].shape)} in the "
                              f"checkpoint, {list(tensor.shape)} here (resume with the sae / data settings of the run that wrote it)")


# --- non-finite values ------------------------------------------------------------------------
def require_finite(tensors: Mapping[str, Any], where: str) -> None:
    """NonFiniteError naming the first floating tensor of `tensors` with a NaN or infinite value."""
    for name, t in tensors.items():
        if getattr(t, "is_floating_point", lambda: False)():
            bad = int((~t.detach().isfinite()).sum())
            if bad:
                raise NonFiniteError(f"{where}: tensor {name!r} has {bad} non-finite values (NaN/inf) of {t.numel()}; "
                                     "the SAE diverged (lower module.lr, check the data)")


def require_finite_metrics(metrics: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(f"{where}: {key} is {value}; the SAE's output is not finite")


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
