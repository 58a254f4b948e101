"""`vae_exp [overrides]` (or `python -m vae_exp`): the Hydra entry point."""

from __future__ import annotations

import difflib
import logging
import re
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, ConfigCompositionException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vae_exp.config import ConfigError
from vae_exp.distributed import global_rank, launched_by_torchrun
from vae_exp.tracking import RunLabels
from vae_exp.train import Preempted, TrainingStopped, fit

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

log = logging.getLogger("vae_exp")


def swept_keys(sweep_dir: Path) -> set[str]:
    """The keys a sweep varies (e.g. {"model.latent_dim"}), read from its multirun.yaml."""
    multirun_yaml = sweep_dir / "multirun.yaml"
    if not multirun_yaml.is_file():
        return set()
    overrides = list(OmegaConf.load(multirun_yaml).hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def swept_overrides(overrides: list[str], swept: set[str]) -> list[str]:
    """The overrides of one job that set a swept key ("model.latent_dim=64")."""
    return [o for o in overrides if o.partition("=")[0].lstrip("+~") in swept]


def job_labels(hydra_cfg: DictConfig) -> RunLabels:
    """W&B name, group and tags of a sweep job: the group is the sweep folder, the name the
    values of the swept keys (read from the sweep's multirun.yaml), which are also the tags."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return RunLabels()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    job = swept_overrides(list(hydra_cfg.overrides.task), swept_keys(sweep_dir))
    pairs = [o.partition("=") for o in job]  # "model.latent_dim=64" -> "latent_dim=64"
    name = ",".join(f"{re.split(r'[./]', key)[-1]}={value}" for key, _, value in pairs)
    return RunLabels(name=name or None, group=str(sweep_dir), tags=[t[:64] for t in job])


def failed_jobs_summary(sweep_dir: Path) -> str:
    """One line naming the failed jobs of the sweep in `sweep_dir`: the job folders whose log
    holds an error (the rule vae_exp.compare uses too), with their swept values."""
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()]
    jobs.sort(key=lambda p: (len(p.name), p.name))  # job folders 0, 1, ..., 9, 10, ...
    failed = [j for j in jobs if "[ERROR]" in _read_text(j / "vae_exp.log")]
    swept = swept_keys(sweep_dir)
    names = []
    for job in failed:
        overrides_yaml = job / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(overrides_yaml)) if overrides_yaml.is_file() else []
        names.append(f"job {job.name} ({' '.join(swept_overrides(overrides, swept))})")
    return (
        f"{len(failed)} of {len(jobs)} sweep jobs failed: {'; '.join(names)}. Each job's error "
        f"is above and in its vae_exp.log under {sweep_dir}."
    )


def _read_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


class SweepJobFailed(CompactHydraException):
    """Raised by a sweep job that stopped on a ConfigError or TrainingStopped (its paragraph is
    already logged). Hydra records the job as failed and runs the sweep's other jobs; then it
    prints this exception's text, without a traceback (a CompactHydraException), and exits 1.
    The text is made when printed, when every job has run: the summary of the failed jobs."""

    def __init__(self, sweep_dir: str) -> None:
        super().__init__(sweep_dir)  # in args, so the exception pickles (parallel launchers)

    def __str__(self) -> str:
        return failed_jobs_summary(Path(self.args[0]))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one run (one job of a sweep); returns the best validation loss."""
    hydra_cfg = HydraConfig.get()
    try:
        return fit(cfg, Path(hydra_cfg.runtime.output_dir), job_labels(hydra_cfg))
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without a checkpoint
        log.error(
            "Stopped at once by a second Ctrl-C: the current step was not checkpointed; the "
            "last checkpoint written (if any) is kept in %s.",
            Path(hydra_cfg.runtime.output_dir) / "checkpoints",
        )
        sys.exit(130)
    except (ConfigError, TrainingStopped) as e:
        log.error("%s", e)
        if hydra_cfg.mode == RunMode.MULTIRUN and not isinstance(e, Preempted):
            raise SweepJobFailed(str(hydra_cfg.sweep.dir)) from e  # the other jobs go on
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


def check_override_keys(args: list[str]) -> None:
    """A misspelt key (`model.latent_dims=64`) gets one paragraph naming it, the nearest key
    and the keys its section has, and exit code 2, instead of Hydra's advice to add it with
    `+`. The overrides are composed once here, a sweep's with the first value of each swept
    key (not for a sweep over config groups); whatever else goes wrong is left to Hydra."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return  # Hydra's own flags (--help, --cfg, -sc, ...)
    try:
        parsed = OverridesParser.create().parse_overrides(
            [a for a in args if a not in ("-m", "--multirun")]
        )
        single = [
            f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
            if o.is_sweep_override()
            else o.input_line
            for o in parsed
        ]
    except Exception:  # a syntax Hydra explains, or a sweep without values (interval)
        return
    if any(o.is_sweep_override() and "." not in o.key_or_group for o in parsed):
        return  # a sweep over config groups (model=a,b): their keys differ from job to job
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            compose(config_name="config", overrides=single)
            return
        except ConfigCompositionException as e:
            found = re.match(r"Could not override '([^']+)'", str(e))
            if not found or "not in struct" not in str(e.__cause__):
                return
            key = found.group(1)
        try:
            rest = [o for o in single if o.partition("=")[0] != key]
            cfg = compose(config_name="config", overrides=rest)
        except Exception:
            return
    parent, _, leaf = key.rpartition(".")
    section = OmegaConf.select(cfg, parent) if parent else cfg
    keys = [str(k) for k in section] if isinstance(section, DictConfig) else []
    near = difflib.get_close_matches(leaf, keys, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{near[0]}?)" if near else ""
    where = f"the keys of {parent} are" if parent else "the top-level keys are"
    print(
        f"vae_exp: Invalid config: unknown key {key}{hint}; {where}: {', '.join(keys)}. "
        "Nothing was run.",
        file=sys.stderr,
    )
    sys.exit(2)


def cli() -> None:
    """`python -m vae_exp` and the `vae_exp` console script (pyproject.toml), with which
    Hydra's tab completion works: `eval "$(vae_exp -sc install=bash)"`."""
    check_override_keys(sys.argv[1:])
    prepare_torchrun(sys.argv)
    main()


if __name__ == "__main__":
    cli()
