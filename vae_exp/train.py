"""The training loop, top to bottom: build everything from the config, then epochs of
train steps, validation, grids, metrics and checkpoints."""

from __future__ import annotations

import inspect
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from vae_exp.checkpoint import save_checkpoint
from vae_exp.config import (
    ConfigError,
    check_model_matches_data,
    check_optimizer,
    instantiate_checked,
    read_data,
    read_logger,
    read_trainer,
)
from vae_exp.data import Batches, build_data
from vae_exp.losses import VAELoss
from vae_exp.models import VAE
from vae_exp.tracking import Tracker, image_grid

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU; an unavailable device is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(name.partition(":")[2] or 0) >= count:
            allowed = " | ".join(["auto", "cpu", *(f"cuda:{i}" for i in range(count))])
            raise ConfigError(
                f"Invalid config: trainer.device={name!r} but this machine has {count} CUDA "
                f"device(s){' (CUDA is not available here)' if count == 0 else ''}; "
                f"allowed: {allowed}."
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "Invalid config: trainer.device='mps' is not available here; allowed: auto | cpu."
        )
    return torch.device(name)


def build_model(cfg: DictConfig, loss_fn: VAELoss) -> VAE:
    """The model of `cfg.model`, its decoder output matched to the loss's likelihood."""
    return instantiate_checked(cfg.model, "model", decoder_output=loss_fn.decoder_output)


def build_optimizer(cfg: DictConfig, model: VAE, epochs: int):
    """The optimizer of `cfg.optim` and its optional LR scheduler (stepped once per epoch).
    The scheduler is first tried for `epochs` steps on a throwaway optimizer, so a bad setting
    fails now rather than after an epoch of training."""
    check_optimizer(cfg.optim)
    make_optimizer = instantiate_checked(cfg.optim.optimizer, "optim.optimizer")
    try:
        optimizer = make_optimizer(model.parameters())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Invalid config for optim.optimizer: {e}") from e
    if cfg.optim.get("scheduler") is None:
        return optimizer, None
    make_scheduler = instantiate_checked(cfg.optim.scheduler, "optim.scheduler")
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


def train_epoch(
    model: VAE,
    loss_fn: VAELoss,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    tracker: Tracker,
    step: int,
    log_every: int,
    progress: tqdm,
) -> tuple[dict[str, float], int]:
    """One pass over the training batches. Loss terms are summed on the device and read back
    only every `log_every` steps (no host sync per step). Returns the epoch's mean of the
    per-batch terms (the seed's `total_loss / len(dataloader)`) and the global step."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    window: dict[str, torch.Tensor] = {}
    steps = window_steps = 0
    for x, _ in batches:
        optimizer.zero_grad(set_to_none=True)
        terms = loss_fn(model(x), x)
        terms["loss"].backward()
        optimizer.step()
        step += 1
        steps += 1
        window_steps += 1
        for k, v in terms.items():
            v = v.detach()
            sums[k] = sums[k] + v if k in sums else v
            window[k] = window[k] + v if k in window else v
        progress.update(1)
        if window_steps == log_every or steps == len(batches):
            means = {k: v.item() / window_steps for k, v in window.items()}
            progress.set_postfix(loss=f"{sums['loss'].item() / steps:.4f}")
            tracker.log_step(step, {f"train/{k}": v for k, v in means.items()})
            window, window_steps = {}, 0
    return {k: v.item() / steps for k, v in sums.items()}, step


@torch.no_grad()
def validate(model: VAE, loss_fn: VAELoss, batches: Batches, seed: int) -> dict[str, float]:
    """Mean loss terms per example over the validation batches: the training objective,
    with the model in eval mode and the posterior noise drawn from a generator seeded with
    `seed`, so the same weights always give the same numbers."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    for x, _ in batches:
        terms = loss_fn(model(x, generator=generator), x)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0) + v * x.shape[0]
        seen += x.shape[0]
    return {k: v.item() / seen for k, v in sums.items()}


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Train the experiment described by `cfg`, writing outputs to `run_dir`.
    Returns the best validation loss (what sweepers minimise)."""
    # 1. Check and build everything before any data is loaded or step taken.
    data_cfg = read_data(cfg.data)
    check_model_matches_data(cfg.model, data_cfg)
    trainer = read_trainer(cfg.trainer)
    logger_cfg = read_logger(cfg.logger)
    device = resolve_device(trainer.device)
    torch.manual_seed(trainer.seed)
    loss_fn = instantiate_checked(cfg.loss, "loss")
    model = build_model(cfg, loss_fn).to(device)
    optimizer, scheduler = build_optimizer(cfg, model, trainer.epochs)
    data = build_data(data_cfg, loss_fn.pixel_range, device, trainer.seed)
    config = OmegaConf.to_container(cfg, resolve=True)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "%s: %.2fM parameters on %s; %d train / %d val images; outputs in %s",
        type(model).__name__,
        n_params / 1e6,
        device,
        data.train.num_examples,
        data.val.num_examples,
        run_dir,
    )

    # 2. Fixed inputs for the picture grids, so every epoch's grids are comparable.
    grid_gen = torch.Generator().manual_seed(trainer.seed)
    fixed_z = torch.randn(trainer.sample_grid**2, model.latent_dim, generator=grid_gen).to(device)
    fixed_x = next(iter(data.val))[0][: trainer.num_reconstructions]

    tracker = Tracker(run_dir, config, logger_cfg)
    step, best = 0, math.inf
    try:
        for epoch in range(1, trainer.epochs + 1):
            start = time.perf_counter()
            bar = tqdm(
                total=len(data.train),
                desc=f"Epoch {epoch}/{trainer.epochs}",
                disable=not trainer.progress,
                dynamic_ncols=True,
            )
            with bar:
                train_terms, step = train_epoch(
                    model, loss_fn, optimizer, data.train, tracker, step, trainer.log_every, bar
                )
            val_terms = validate(model, loss_fn, data.val, trainer.seed)
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()
            seconds = time.perf_counter() - start
            metrics = {
                "epoch": epoch,
                "step": step,
                **{f"train/{k}": v for k, v in train_terms.items()},
                **{f"val/{k}": v for k, v in val_terms.items()},
                "lr": lr,
                "seconds": seconds,
            }
            tracker.log_epoch(step, metrics)
            log.info(
                "epoch %d/%d  train loss %.5f (recon %.5f, kld %.3f)  "
                "val loss %.5f (recon %.5f, kld %.3f)  %.1fs",
                epoch,
                trainer.epochs,
                train_terms["loss"],
                train_terms["recon"],
                train_terms["kld"],
                val_terms["loss"],
                val_terms["recon"],
                val_terms["kld"],
                seconds,
            )

            # Pictures: prior samples from the fixed z; fixed validation images over their
            # reconstructions from the posterior mean.
            model.eval()
            with torch.no_grad():
                samples = model.to_image(model.decode(fixed_z))
                recons = model.to_image(model.decode(model.encode(fixed_x).mu))
            value_range = loss_fn.pixel_range
            tracker.log_image(
                step, epoch, "samples", image_grid(samples, trainer.sample_grid, value_range)
            )
            tracker.log_image(
                step,
                epoch,
                "reconstructions",
                image_grid(torch.cat([fixed_x, recons]), len(fixed_x), value_range),
            )

            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch,
                "step": step,
                "config": config,
                "metrics": metrics,
            }
            if trainer.checkpoint.save_last:
                save_checkpoint(run_dir / "checkpoints" / "last.pt", state)
            if val_terms["loss"] < best:
                best = val_terms["loss"]
                if trainer.checkpoint.save_best:
                    save_checkpoint(run_dir / "checkpoints" / "best.pt", state)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish(exit_code=0)
    return best
