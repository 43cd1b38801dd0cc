"""Jobs the entry points call; `cfg.job` picks one (train, upgrade)."""

from __future__ import annotations

from omegaconf import DictConfig


def run(cfg: DictConfig) -> float | None:
    job = cfg.get("job", "train")
    if job == "train":
        from rsae.jobs.train import main
    elif job == "upgrade":
        from rsae.jobs.upgrade import main
    else:
        raise SystemExit(f"error: unknown job {job!r} (train, upgrade)")
    return main(cfg)
