"""Train an SAE: `python train.py sae=topk data=synthetic trainer.max_steps=300`."""

import hydra
from omegaconf import DictConfig

import rsae.config  # noqa: F401  (registers the config resolvers)
from rsae.jobs.train import main as train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
