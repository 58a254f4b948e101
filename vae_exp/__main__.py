"""`python -m vae_exp [overrides]`: the Hydra entry point."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vae_exp.config import ConfigError
from vae_exp.distributed import global_rank, launched_by_torchrun
from vae_exp.tracking import RunLabels

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

log = logging.getLogger("vae_exp")


def job_labels(hydra_cfg: DictConfig) -> RunLabels:
    """W&B name, group and tags of a sweep job: the group is the sweep folder, the name the
    values of the swept keys (read from the sweep's multirun.yaml), which are also the tags."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return RunLabels()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    swept: set[str] = set()
    multirun_yaml = sweep_dir / "multirun.yaml"
    if multirun_yaml.is_file():
        overrides = list(OmegaConf.load(multirun_yaml).hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
        swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    job = [o for o in hydra_cfg.overrides.task if o.partition("=")[0].lstrip("+~") in swept]
    pairs = [o.partition("=") for o in job]  # "model.latent_dim=64" -> "latent_dim=64"
    name = ",".join(f"{re.split(r'[./]', key)[-1]}={value}" for key, _, value in pairs)
    return RunLabels(name=name or None, group=str(sweep_dir), tags=[t[:64] for t in job])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one run (one job of a sweep); returns the best validation loss."""
    from vae_exp.train import Preempted, TrainingStopped, run

    hydra_cfg = HydraConfig.get()
    try:
        return run(cfg, Path(hydra_cfg.runtime.output_dir), job_labels(hydra_cfg))
    except (ConfigError, TrainingStopped) as e:
        log.error("%s", e)
        if hydra_cfg.mode == RunMode.MULTIRUN and not isinstance(e, Preempted):
            raise  # the sweep's other jobs go on; Hydra reports this job as failed at the end
        sys.exit(getattr(e, "exit_code", 2))


def prepare_torchrun(argv: list[str]) -> None:
    """Under torchrun, only rank 0 writes files: the other processes get Hydra overrides that
    leave no run directory, no .hydra/ and no log file behind (they log to stdout). A sweep
    cannot be run inside torchrun (each process would run the whole sweep)."""
    if not launched_by_torchrun():
        return
    if any(a in ("-m", "--multirun") for a in argv[1:]):
        sys.exit(
            "vae_exp: --multirun cannot run under torchrun; run torchrun once per job, or sweep "
            "with launcher=submitit_local / launcher=slurm."
        )
    if global_rank() != 0:
        argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


if __name__ == "__main__":
    prepare_torchrun(sys.argv)
    main()
