"""Train an SAE (`python train.py sae=topk data=synthetic`) or upgrade one to an RSAE
(`python train.py sae=rational teacher.path=<exported SAE dir>`)."""

import sys

import hydra
# Imported before Hydra sets up logging, so that conf/hydra/job_logging/rsae.yaml can remove
# Lightning's own console handler (each Lightning line would be printed twice).
import lightning  # noqa: F401
from omegaconf import DictConfig

import rsae.config  # noqa: F401  (registers the config resolvers)
from rsae.errors import ConfigError
from rsae.jobs import run
from rsae.validate_upgrade import check_overrides


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])  # an RSAE setting under upgrade.: say where it moved (Hydra would not)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    main()
