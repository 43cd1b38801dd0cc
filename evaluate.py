"""Evaluate an exported SAE: `python evaluate.py sae_path=<train run>/sae data=activations`."""

import hydra
from omegaconf import DictConfig

import rsae.config  # noqa: F401  (registers the config resolvers)
from rsae.jobs.evaluate import main as evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return evaluate(cfg)


if __name__ == "__main__":
    main()
