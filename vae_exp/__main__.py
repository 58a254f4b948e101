"""`python -m vae_exp [overrides]`: the Hydra entry point."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vae_exp.config import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

log = logging.getLogger("vae_exp")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one run (one job of a sweep); returns the best validation loss."""
    from vae_exp.train import Preempted, TrainingStopped, run

    hydra_cfg = HydraConfig.get()
    try:
        return run(cfg, Path(hydra_cfg.runtime.output_dir))
    except (ConfigError, TrainingStopped) as e:
        log.error("%s", e)
        if hydra_cfg.mode == RunMode.MULTIRUN and not isinstance(e, Preempted):
            raise  # the sweep's other jobs go on; Hydra reports this job as failed at the end
        sys.exit(getattr(e, "exit_code", 2))


if __name__ == "__main__":
    main()
