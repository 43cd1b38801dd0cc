"""OmegaConf resolvers used by the YAML configs (registered once, on import)."""

from __future__ import annotations

from omegaconf import OmegaConf


def _register(name: str, fn) -> None:
    if not OmegaConf.has_resolver(name):
        OmegaConf.register_new_resolver(name, fn)


_register("rsae.mul", lambda a, b: a * b)


def wandb_offline() -> bool:
    """W&B stays offline unless WANDB_MODE=online is set explicitly."""
    import os

    return os.environ.get("WANDB_MODE", "offline") != "online"


_register("rsae.wandb_offline", wandb_offline)


def run_group(default: str) -> str:
    """W&B group: the sweep a trial belongs to (set by the subprocess launcher), else `default`."""
    import os
    from pathlib import Path

    sweep = os.environ.get("RSAE_SWEEP_DIR")
    return f"{default}/{Path(sweep).parent.name}-{Path(sweep).name}" if sweep else default


_register("rsae.run_group", run_group)


def job(*, _root_) -> str:
    """`job`'s default: upgrade when the config names a teacher (`teacher.path`, even `???`), else train."""
    teacher = _root_.get("teacher")
    if not OmegaConf.is_dict(teacher) or "path" not in teacher:
        return "train"
    return "upgrade" if OmegaConf.is_missing(teacher, "path") or teacher.get("path") is not None else "train"


_register("rsae.job", job)


def upgrading(upgrade_value, scratch_value, *, _root_):
    """`${rsae.upgrading:U,S}`: U when the job is the upgrade of a teacher, else S (e.g. a default of
    conf/sae/rational.yaml that differs between an upgrade and training from scratch)."""
    return upgrade_value if _root_.get("job") == "upgrade" else scratch_value


_register("rsae.upgrading", upgrading)
