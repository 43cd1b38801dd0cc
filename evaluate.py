"""Evaluate an exported SAE: `python evaluate.py sae_path=<train run>/sae data=activations`."""

import hydra
# Imported before Hydra sets up logging, so that conf/hydra/job_logging/rsae.yaml can remove
# Lightning's own console handler (each Lightning line would be printed twice).
import lightning  # noqa: F401
from omegaconf import DictConfig

import rsae.config  # noqa: F401  (registers the config resolvers)
from rsae.jobs.evaluate import main as evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return evaluate(cfg)


if __name__ == "__main__":
    main()
