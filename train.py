"""Train an SAE (`python train.py sae=topk data=synthetic`) or upgrade one to an RSAE
(`python train.py experiment=rsae_upgrade teacher.path=<exported SAE dir>`)."""

import hydra
# Imported before Hydra sets up logging, so that conf/hydra/job_logging/rsae.yaml can remove
# Lightning's own console handler (each Lightning line would be printed twice).
import lightning  # noqa: F401
from omegaconf import DictConfig

import rsae.config  # noqa: F401  (registers the config resolvers)
from rsae.jobs import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
