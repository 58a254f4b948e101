"""The config's vocabulary and checks, run before anything is loaded or trained: the ground
floor of vae_exp (it imports no other module of the package).

The `data`, `trainer`, `logger` and `eval` sections are read into the dataclasses below (unknown
keys and bad values are errors naming the key and what is allowed); `model`, `loss` and `optim`
are `_target_` configs whose constructors check their own arguments with the shared checks
here (`is_count`, `is_number`, `invalid`), built by vae_exp.build.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import secrets
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# conf/config.yaml's ${sweep_id:} and ${run_id:}: a short random id, the same for every job of
# one sweep (resolver results are cached with the config and Hydra copies that cache to each
# job); it keeps the folders and W&B groups of two sweeps (or single runs) started in the same
# second apart.
for _name in ("sweep_id", "run_id"):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, lambda: secrets.token_hex(3), use_cache=True)


class ConfigError(ValueError):
    """A bad config value or missing input: the message names the key and what is allowed."""


# The vocabulary: every allowed value of the keys that take a word.
DATASETS = ("mnist", "fashion_mnist", "cifar10", "folder")
SPLITS = ("train", "test")
BINARIZE = ("none", "dynamic", "static")
PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")
OPTIM_KEYS = ("optimizer", "scheduler")


@dataclasses.dataclass
class DataConfig:
    name: str
    root: str | None  # null: ./data, then the system folders (vae_exp.data.data_root)
    image_size: int
    channels: int
    batch_size: int
    num_workers: int
    download: bool
    limit: int | None
    train_split: str
    val_split: str
    device_resident: bool | str
    binarize: str = "none"  # none | dynamic | static (vae_exp.data's notes)
    val_batch_size: int = 1024  # validation batches (eval mode: per-image, any size)
    val_fraction: float = 0.05  # folder only


@dataclasses.dataclass
class CheckpointConfig:
    save_last: bool
    save_best: bool


@dataclasses.dataclass
class TrainerConfig:
    epochs: int
    device: str
    seed: int
    log_every: int
    progress: bool
    sample_grid: int
    num_reconstructions: int
    checkpoint: CheckpointConfig
    resume: str | None
    skip_nonfinite: int
    precision: str
    channels_last: bool
    cuda_graph: str | bool = "auto"
    compile: str | bool = False


@dataclasses.dataclass
class LoggerConfig:
    name: str
    project: str = "vae_exp"
    entity: str | None = None
    mode: str = "auto"
    group: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    log_images: bool = True
    init_timeout: float = 60.0


@dataclasses.dataclass
class EvalConfig:
    """The `eval` section: the evaluation on the test split (vae_exp.evaluate)."""

    enabled: bool = True  # evaluate the final model when training ends
    k: int | str = "auto"  # importance samples per image for log p(x); auto: 1000 on CUDA
    chunk: int = 8  # samples decoded at once per image (memory: chunk x batch images)
    split: str = "test"
    limit: int | None = None  # first N images of the split (null: all)
    batch_size: int | str = "auto"  # images per batch: auto | an integer (data.val_batch_size)
    sigma: float | str = "implied"  # Gaussian decoder std for mse_kld: implied | a number
    seed: int = 0


# The top level of a composed config: the config groups that hold settings, and `eval`
# (plus Hydra's own `hydra`, where a config still has it).
TOP_LEVEL_KEYS = ("model", "data", "optim", "loss", "trainer", "logger", "eval")


def check_top_level_keys(cfg: Mapping) -> None:
    """Only the known top-level keys: `+epochs=50` is an error, not a silently ignored key."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg)  # unresolved: only the keys are read
    for key in cfg:
        if key not in (*TOP_LEVEL_KEYS, "hydra"):
            known = {k: v for k, v in cfg.items() if k in TOP_LEVEL_KEYS}
            nested = _paths_of(key, known)
            hint = f" (did you mean {' or '.join(nested)}?)" if nested else ""
            raise ConfigError(
                f"Invalid config: unknown top-level key {key}{hint}; the top-level keys are "
                f"{', '.join(TOP_LEVEL_KEYS)}."
            )


def _paths_of(key: str, tree: Mapping, prefix: str = "") -> list[str]:
    """The full paths of `key` anywhere in a nested mapping ("optim.optimizer.lr")."""
    paths = []
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if name == key:
            paths.append(path)
        if isinstance(value, Mapping):
            paths += _paths_of(key, value, path + ".")
    return paths


def one_line(error: BaseException) -> str:
    """An exception as one line (torchvision's download errors span many)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def invalid(key: str, value: Any, allowed: str) -> ConfigError:
    """The error for a bad value: 'Invalid config: key=value; allowed: ...'."""
    return ConfigError(f"Invalid config: {key}={value!r}; allowed: {allowed}.")


def _read(cls: type, section: Mapping, prefix: str) -> Any:
    """Build dataclass `cls` from a config section; unknown or missing keys are errors."""
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ConfigError(
            f"Invalid config: unknown key {prefix}.{unknown[0]}; the keys of {prefix} are "
            f"{', '.join(fields)}."
        )
    required = [
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in section]
    if missing:
        raise ConfigError(f"Invalid config: {prefix}.{missing[0]} is missing.")
    return cls(**section)


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise `invalid(key, value, allowed)` unless `ok`."""
    if not ok:
        raise invalid(key, value, allowed)


def is_integer(v: Any) -> bool:
    """An int, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_count(v: Any) -> bool:
    """An int >= 1 (not a bool): what counts, sizes and dimensions must be."""
    return is_integer(v) and v >= 1


def is_number(v: Any) -> bool:
    """A finite int or float: not a bool, nan or inf (Hydra reads `inf` and `nan` as floats)."""
    return is_integer(v) or (isinstance(v, float) and math.isfinite(v))


SEED_LIMIT = 2**63  # torch seeds are < 2**64; trainer.seed + an offset (step, rank) stays below


def _check_seed(value: Any, key: str) -> None:
    check(is_integer(value) and 0 <= value < SEED_LIMIT, key, value, "an integer in [0, 2**63)")


def _check_ints(obj: Any, prefix: str, minimums: dict[str, int]) -> None:
    """Each named field of `obj` must be an integer >= its minimum."""
    for name, minimum in minimums.items():
        value = getattr(obj, name)
        check(
            is_integer(value) and value >= minimum,
            f"{prefix}.{name}",
            value,
            f"an integer >= {minimum}",
        )


def check_val_batch_size(value: Any, key: str) -> None:
    check(
        value == "auto" or (is_integer(value) and value >= 1),
        key,
        value,
        "auto (1024 on CUDA, 64 elsewhere) | an integer >= 1",
    )


def val_batch_size(setting: int | str, device_type: str) -> int:
    """Images per validation or evaluation batch: the setting, or for `auto` 1024 on CUDA
    (a GPU runs a big batch in about the time of a small one) and 64 elsewhere (measured on a
    2-core CPU: 10,000 validation images took about 2 s in batches of 64, 4.5 s in batches
    of 1024; benchmarks/RESULTS.md)."""
    if setting != "auto":
        return int(setting)
    return 1024 if device_type == "cuda" else 64


def _check_bools(obj: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        check(isinstance(value, bool), f"{prefix}.{name}", value, "true or false")


def read_data(section: Mapping) -> DataConfig:
    d = _read(DataConfig, section, "data")
    check(d.name in DATASETS, "data.name", d.name, " | ".join(DATASETS))
    check(
        (isinstance(d.root, str) and d.root not in ("", "???"))  # ???: not given (folder)
        or (d.root is None and d.name != "folder"),
        "data.root",
        d.root,
        "a folder path, or null (./data, then the system folders; not for data=folder)",
    )
    _check_ints(d, "data", {"image_size": 1, "batch_size": 1, "num_workers": 0})
    check_val_batch_size(d.val_batch_size, "data.val_batch_size")
    check(d.channels in (1, 3), "data.channels", d.channels, "1 (grey) or 3 (RGB)")
    _check_bools(d, "data", ("download",))
    check(
        d.limit is None or (is_integer(d.limit) and d.limit >= 1),
        "data.limit",
        d.limit,
        "null (all images) or an integer >= 1",
    )
    check(d.train_split in SPLITS, "data.train_split", d.train_split, " | ".join(SPLITS))
    check(d.val_split in SPLITS, "data.val_split", d.val_split, " | ".join(SPLITS))
    if d.train_split == d.val_split:
        log.warning(
            "data.train_split = data.val_split = %s: validation numbers are on training images",
            d.train_split,
        )
    check(
        d.device_resident in ("auto", True, False),
        "data.device_resident",
        d.device_resident,
        "auto | true | false",
    )
    check(d.binarize in BINARIZE, "data.binarize", d.binarize, " | ".join(BINARIZE))
    if d.name != "folder" and "val_fraction" in section:
        raise ConfigError(
            f"Invalid config: unknown key data.val_fraction for data={d.name}; it is an option "
            "of data=folder only."
        )
    if d.name == "folder":
        check(
            d.download is False,
            "data.download",
            d.download,
            "false (a folder of images cannot be downloaded)",
        )
        check(
            is_number(d.val_fraction) and 0 < d.val_fraction <= 0.5,
            "data.val_fraction",
            d.val_fraction,
            "a number in (0, 0.5]",
        )
    return d


def read_trainer(section: Mapping) -> TrainerConfig:
    checkpoint = section.get("checkpoint")
    check(
        isinstance(checkpoint, Mapping),
        "trainer.checkpoint",
        checkpoint,
        "a mapping with save_last and save_best",
    )
    checkpoint = _read(CheckpointConfig, checkpoint, "trainer.checkpoint")
    t = _read(TrainerConfig, {**section, "checkpoint": checkpoint}, "trainer")
    minimums = {"epochs": 1, "log_every": 1, "sample_grid": 1, "num_reconstructions": 1}
    _check_ints(t, "trainer", {**minimums, "skip_nonfinite": 0})
    check(
        isinstance(t.device, str) and DEVICE_PATTERN.fullmatch(t.device) is not None,
        "trainer.device",
        t.device,
        "auto | cpu | cuda | cuda:N | mps",
    )
    _check_seed(t.seed, "trainer.seed")
    check(
        t.resume is None or (isinstance(t.resume, str) and t.resume != ""),
        "trainer.resume",
        t.resume,
        "null, auto, a run directory or a checkpoint file",
    )
    check(t.precision in PRECISIONS, "trainer.precision", t.precision, " | ".join(PRECISIONS))
    check(
        t.cuda_graph in ("auto", True, False),
        "trainer.cuda_graph",
        t.cuda_graph,
        "auto | true | false",
    )
    check(
        t.compile is False or t.compile in COMPILE_MODES,
        "trainer.compile",
        t.compile,
        "false | " + " | ".join(COMPILE_MODES),
    )
    _check_bools(t, "trainer", ("progress", "channels_last"))
    _check_bools(t.checkpoint, "trainer.checkpoint", ("save_last", "save_best"))
    return t


def read_eval(section: Mapping | None) -> EvalConfig:
    """The `eval` section, checked; missing keys (an older run's config) take the defaults."""
    e = _read(EvalConfig, section if section is not None else {}, "eval")
    _check_bools(e, "eval", ("enabled",))
    check(
        e.k == "auto" or (is_integer(e.k) and e.k >= 1),
        "eval.k",
        e.k,
        "auto (1000 on CUDA, 10 otherwise) | an integer >= 1",
    )
    _check_ints(e, "eval", {"chunk": 1})
    check_val_batch_size(e.batch_size, "eval.batch_size")
    check(e.split in SPLITS, "eval.split", e.split, " | ".join(SPLITS))
    check(
        e.limit is None or (is_integer(e.limit) and e.limit >= 1),
        "eval.limit",
        e.limit,
        "null (all images) or an integer >= 1",
    )
    check(
        e.sigma == "implied" or (is_number(e.sigma) and e.sigma > 0),
        "eval.sigma",
        e.sigma,
        "implied | a finite number > 0 (the Gaussian decoder's std)",
    )
    _check_seed(e.seed, "eval.seed")
    return e


def read_logger(section: Mapping) -> LoggerConfig:
    name = section.get("name")
    check(name in LOGGERS, "logger.name", name, " | ".join(LOGGERS))
    if name == "none" and len(section) > 1:
        extra = sorted(set(section) - {"name"})[0]
        raise ConfigError(
            f"Invalid config: unknown key logger.{extra}; logger=none has no options."
        )
    lg = _read(LoggerConfig, section, "logger")
    check(lg.mode in WANDB_MODES, "logger.mode", lg.mode, " | ".join(WANDB_MODES))
    check(isinstance(lg.project, str) and lg.project, "logger.project", lg.project, "a name")
    for key in ("entity", "group"):
        value = getattr(lg, key)
        check(value is None or isinstance(value, str), f"logger.{key}", value, "null or a name")
    check(
        isinstance(lg.tags, list) and all(isinstance(t, str) for t in lg.tags),
        "logger.tags",
        lg.tags,
        "a list of strings",
    )
    _check_bools(lg, "logger", ("log_images",))
    check(
        is_number(lg.init_timeout) and lg.init_timeout > 0,
        "logger.init_timeout",
        lg.init_timeout,
        "a finite number of seconds > 0",
    )
    return lg


def check_optimizer(section: DictConfig) -> None:
    """Known keys only; learning rate > 0, weight decay >= 0 and fused auto, a boolean or
    null, before anything is built."""
    unknown = sorted(set(section) - set(OPTIM_KEYS))
    if unknown:
        raise ConfigError(
            f"Invalid config: unknown key optim.{unknown[0]}; the keys of optim are "
            f"{', '.join(OPTIM_KEYS)} (optimizer settings go under optim.optimizer)."
        )
    lr = section.optimizer.get("lr")
    check(is_number(lr) and lr > 0, "optim.optimizer.lr", lr, "a finite number > 0")
    wd = section.optimizer.get("weight_decay", 0.0)
    check(is_number(wd) and wd >= 0, "optim.optimizer.weight_decay", wd, "a finite number >= 0")
    fused = section.optimizer.get("fused")
    check(
        fused is None or isinstance(fused, bool) or fused == "auto",
        "optim.optimizer.fused",
        fused,
        "auto (fused on CUDA) | true | false | null",
    )


def check_model_matches_data(model: DictConfig, data: DataConfig) -> None:
    """model.in_channels / model.image_size, where a model has them, must equal the data's
    (they are interpolated from it by default; an override that breaks that is an error).
    Every model's other constraints (the conv models' image_size divisibility, num_classes)
    are checked by its constructor."""
    for key in ("in_channels", "image_size"):
        data_key = "channels" if key == "in_channels" else key
        if key in model and model[key] != getattr(data, data_key):
            raise ConfigError(
                f"Invalid config: model.{key}={model[key]!r} but data.{data_key}="
                f"{getattr(data, data_key)!r}; allowed: the data's value (leave model.{key} "
                f"at its default, ${{data.{data_key}}}, and change data.{data_key} instead)."
            )
