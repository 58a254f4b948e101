"""Building an experiment from its config: the checked config sections, the device, the model,
the loss, the optimizer and its schedule, and the data. Nothing here trains; `build_experiment`
returns every built part in one `Experiment`, which the training loop and the checkpoints use.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from vae_exp.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggerConfig,
    TrainerConfig,
    check_model_matches_data,
    check_optimizer,
    check_top_level_keys,
    read_data,
    read_eval,
    read_logger,
    read_trainer,
)
from vae_exp.data import Data, build_data
from vae_exp.distributed import Cluster
from vae_exp.losses import VAELoss
from vae_exp.models import VAE

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    """Everything one run is made of, built and checked from its config."""

    cfg: DictConfig  # as composed by Hydra
    config: dict[str, Any]  # the same, resolved to plain values (checkpoints, W&B)
    trainer: TrainerConfig
    data_cfg: DataConfig
    logger: LoggerConfig
    evaluation: EvalConfig
    cluster: Cluster
    device: torch.device
    model: VAE
    loss_fn: VAELoss
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch.optim.lr_scheduler, or None
    data: Data


def check_target_keys(section: DictConfig, key: str, supplied: tuple[str, ...] = ()) -> None:
    """Every key of a `_target_` config must be a parameter of its target; `supplied` are
    the parameters the code passes itself (not config keys)."""
    try:
        target = get_object(section._target_)
        params = inspect.signature(target).parameters
    except Exception as e:
        raise ConfigError(
            f"Invalid config: {key}._target_={section.get('_target_')!r} cannot be used: {e}"
        ) from e
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the target takes any keyword
    allowed = [n for n in params if n not in supplied and n != "self"]
    for name in section:
        if not str(name).startswith("_") and name not in allowed:
            raise ConfigError(
                f"Invalid config: unknown key {key}.{name}; the keys of {key} "
                f"({section._target_}) are {', '.join(allowed)}."
            )


def instantiate_checked(
    section: DictConfig, key: str, supplied: tuple[str, ...] = (), **kwargs: Any
) -> Any:
    """`hydra.utils.instantiate` after `check_target_keys`; errors in the target's arguments
    become ConfigErrors naming `key` (a target's own ConfigError is passed on as it is).
    `kwargs` are passed on to the target."""
    check_target_keys(section, key, supplied + tuple(kwargs))
    try:
        return instantiate(section, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"Invalid config for {key}: {cause}") from e


def build_model(cfg: DictConfig, loss_fn: VAELoss) -> VAE:
    """The model of `cfg.model`, its decoder output matched to the loss's likelihood."""
    return instantiate_checked(cfg.model, "model", decoder_output=loss_fn.decoder_output)


def build_optimizer(cfg: DictConfig, model: VAE, epochs: int):
    """The optimizer of `cfg.optim` and its optional LR scheduler (stepped once per epoch).
    The scheduler is first tried for `epochs` steps on a throwaway optimizer, so a bad setting
    fails now rather than after an epoch of training."""
    check_optimizer(cfg.optim)
    make_optimizer = instantiate_checked(
        cfg.optim.optimizer, "optim.optimizer", supplied=("params",)
    )
    try:
        optimizer = make_optimizer(model.parameters())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Invalid config for optim.optimizer: {e}") from e
    if cfg.optim.get("scheduler") is None:
        return optimizer, None
    make_scheduler = instantiate_checked(
        cfg.optim.scheduler, "optim.scheduler", supplied=("optimizer",)
    )
    try:
        accepted = inspect.signature(type(optimizer)).parameters
        settings = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        probe = type(optimizer)([torch.zeros(1, requires_grad=True)], **settings)
        probe_scheduler = make_scheduler(probe)
        for _ in range(epochs):
            probe.step()
            probe_scheduler.step()
        scheduler = make_scheduler(optimizer)
    except Exception as e:
        raise ConfigError(f"Invalid config for optim.scheduler: {type(e).__name__}: {e}") from e
    return optimizer, scheduler


def check_batch_norm(
    model: torch.nn.Module, batch_size: int, limit: int | None, train_images: int | None = None
) -> None:
    """BatchNorm cannot train on a batch of one image: a model with BatchNorm layers needs
    data.batch_size >= 2 and a training split of >= 2 images (`train_images`, once loaded)."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    why = f"{type(model).__name__} has BatchNorm layers, which cannot train on a batch of one image"
    if batch_size < 2:
        raise ConfigError(
            f"Invalid config: data.batch_size={batch_size} but {why}; allowed: data.batch_size "
            ">= 2 for this model (or a model without BatchNorm, such as model=mlp_vae)."
        )
    if limit is not None and limit < 2:
        raise ConfigError(
            f"Invalid config: data.limit={limit} leaves one training image but {why}; allowed: "
            "data.limit >= 2 (or null) for this model."
        )
    if train_images is not None and train_images < 2:
        raise ConfigError(
            f"Invalid config: the training split holds {train_images} image(s) but {why}; "
            "allowed: a training split (data.root, data.train_split) of >= 2 images."
        )


def check_labels(data: Data, num_classes: int) -> None:
    """A conditional model needs every label in [0, num_classes): checked once, here."""
    if not num_classes:
        return
    for role, batches in (("train", data.train), ("val", data.val)):
        labels = batches.all_labels()
        if len(labels) and not (int(labels.min()) >= 0 and int(labels.max()) < num_classes):
            raise ConfigError(
                f"Invalid config: model.num_classes={num_classes} but the {role} split has "
                f"labels {int(labels.min())}..{int(labels.max())}; allowed: model.num_classes > "
                f"{int(labels.max())}."
            )


def build_experiment(cfg: DictConfig, cluster: Cluster, device: torch.device) -> Experiment:
    """Check every config section, then build the loss, the model, the optimizer (and its
    schedule) and the data for this process (its share of every pass under torchrun). Bad
    settings are ConfigErrors, raised before the data is loaded where they can be."""
    check_top_level_keys(cfg)
    data_cfg = read_data(cfg.data)
    check_model_matches_data(cfg.model, data_cfg)
    trainer = read_trainer(cfg.trainer)
    logger = read_logger(cfg.logger)
    evaluation = read_eval(cfg.get("eval"))
    if cluster.distributed and trainer.skip_nonfinite:
        raise ConfigError(
            f"Invalid config: trainer.skip_nonfinite={trainer.skip_nonfinite} with torchrun; "
            "allowed: 0 (processes cannot skip a step on their own under DDP)."
        )
    torch.manual_seed(trainer.seed)
    loss_fn = instantiate_checked(cfg.loss, "loss").to(device)
    model = build_model(cfg, loss_fn).to(device)
    if trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(cfg, model, trainer.epochs)
    check_batch_norm(model, data_cfg.batch_size, data_cfg.limit)
    data = build_data(data_cfg, loss_fn.pixel_range, device, trainer.seed)
    if data.val.num_examples < cluster.world_size:
        raise ConfigError(
            f"Invalid config: {data.val.num_examples} validation images for "
            f"{cluster.world_size} processes; allowed: at least one image per process."
        )
    check_labels(data, model.num_classes)
    check_batch_norm(model, data_cfg.batch_size, data_cfg.limit, data.train.num_examples)
    data.train.shard(cluster.rank, cluster.world_size)
    data.val.shard(cluster.rank, cluster.world_size)
    return Experiment(
        cfg=cfg,
        config=OmegaConf.to_container(cfg, resolve=True),
        trainer=trainer,
        data_cfg=data_cfg,
        logger=logger,
        evaluation=evaluation,
        cluster=cluster,
        device=device,
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        data=data,
    )


def describe_experiment(exp: Experiment) -> str:
    """One line for the log: the model, its size and device, and the data."""
    cluster = exp.cluster
    rank = f" (rank {cluster.rank} of {cluster.world_size})" if cluster.distributed else ""
    n_params = sum(p.numel() for p in exp.model.parameters())
    return (
        f"{type(exp.model).__name__}: {n_params / 1e6:.2f}M parameters on {exp.device}{rank}; "
        f"{exp.data.train.num_examples} train / {exp.data.val.num_examples} val images"
    )
