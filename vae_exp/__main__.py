"""`python -m vae_exp [overrides]`: the Hydra entry point."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vae_exp.config import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

log = logging.getLogger("vae_exp")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one run (one job of a sweep); returns the best validation loss."""
    from vae_exp.train import TrainingStopped, run

    try:
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)
    except TrainingStopped as e:
        log.error("%s", e)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
