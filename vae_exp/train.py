"""The training loop, top to bottom: build everything from the config, then epochs of
train steps, validation, grids, metrics and checkpoints."""

from __future__ import annotations

import inspect
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from vae_exp.checkpoint import (
    claim_run_dir,
    config_differences,
    find_resume_checkpoint,
    load_checkpoint,
    release_run_dir,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from vae_exp.config import (
    ConfigError,
    TrainerConfig,
    check_model_matches_data,
    check_optimizer,
    instantiate_checked,
    read_data,
    read_logger,
    read_trainer,
)
from vae_exp.data import Batches, build_data
from vae_exp.distributed import Cluster, start_cluster
from vae_exp.evaluate import EvaluationStopped, flat_metrics, read_eval, run_evaluation
from vae_exp.losses import VAELoss
from vae_exp.models import VAE
from vae_exp.preemption import StopRequest
from vae_exp.steps import (
    CapturedStep,
    Step,
    eager_step,
    forward_loss,
    loss_and_gradients,
    set_capturable,
    use_cuda_graph,
)
from vae_exp.tracking import RunLabels, Tracker, image_grid

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


class TrainingStopped(Exception):
    """Training stopped early, after saving what could be saved; `exit_code` for the shell."""

    exit_code = 1


class Preempted(TrainingStopped):
    """SIGTERM / SIGINT: a checkpoint of the current step was written."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


class NonFiniteLoss(TrainingStopped):
    """A NaN or Inf loss or gradient (more than trainer.skip_nonfinite of them)."""

    exit_code = 3


@dataclass
class Position:
    """Where training stands: with the weights, optimizer and RNG states, all a checkpoint
    needs to continue exactly, even from the middle of an epoch."""

    epoch: int = 0  # epochs completed
    batches_done: int = 0  # batches done in the epoch after that (mid-epoch checkpoints)
    epoch_steps: int = 0  # of those, the steps taken (not skipped) and summed in `sums`
    step: int = 0  # optimizer steps taken (skipped non-finite steps not counted)
    sums: dict[str, float] = field(default_factory=dict)  # per-batch terms summed, this epoch
    skipped: int = 0  # non-finite steps skipped so far (trainer.skip_nonfinite)
    best_val_loss: float = math.inf


def train_epoch(
    step: Step,
    model: VAE,
    loss_fn: VAELoss,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    tracker: Tracker,
    pos: Position,
    trainer: TrainerConfig,
    progress: tqdm,
    stop: StopRequest,
    cluster: Cluster | None = None,
) -> None:
    """Train on the batches of one epoch from batch `pos.batches_done` on, updating `pos`.
    `step(x, y)` is one training step (eager, CUDA graph or DDP) returning its loss terms.

    Loss terms are summed on the device and read back only every `log_every` steps (no host
    sync per step). A non-finite loss or gradient stops training (`NonFiniteLoss`), naming the
    first such step, unless trainer.skip_nonfinite allows skipping it (that check syncs every
    step). Returns early, after a whole step, when `stop` has caught a signal (in every
    process of a distributed run: they agree at the log points)."""
    cluster = cluster or Cluster()
    model.train()
    device = next(model.parameters()).device
    # The terms as one vector each step (a few kernel launches, not a few per term), summed
    # over the epoch and over the current log window, in the fixed order of `names`.
    names = list(pos.sums)
    sums = torch.tensor([pos.sums[k] for k in names], device=device) if names else None
    window = None
    window_steps = 0
    first_bad = torch.tensor(-1, device=device)  # global step of the first non-finite step
    bad = None  # the terms of that step
    stopping = False
    for x, y in batches.iterate(start=pos.batches_done):
        loss_fn.at_step(pos.step)  # KL schedules follow the optimizer step
        if trainer.skip_nonfinite:
            terms = careful_step(model, loss_fn, optimizer, x, y, pos, trainer)
        else:
            terms = step(x, y)
        pos.batches_done += 1
        progress.update(1)
        if terms is not None:  # a step was taken (not skipped)
            pos.step += 1
            pos.epoch_steps += 1
            window_steps += 1
            names = names or list(terms)
            vec = torch.stack([terms[k] for k in names])  # new memory: graphs reuse outputs
            newly_bad = ~torch.isfinite(vec).all() & (first_bad < 0)
            first_bad = torch.where(newly_bad, pos.step, first_bad)
            bad = vec if bad is None else torch.where(newly_bad, vec, bad)
            sums = vec if sums is None else sums + vec
            window = vec if window is None else window + vec
        last = pos.batches_done == len(batches)
        at_log_point = window_steps == trainer.log_every or last
        if cluster.distributed:  # processes stop together, deciding at the log points
            stopping = at_log_point and cluster.any(stop.signal_name is not None, device)
        else:
            stopping = stop.signal_name is not None
        if window_steps and (at_log_point or stopping):
            if first_bad.item() >= 0:
                bad_terms = dict(zip(names, bad))
                raise NonFiniteLoss(nonfinite_message(first_bad.item(), bad_terms, trainer))
            means = cluster.sum_(window.clone()) / (cluster.world_size * window_steps)
            loss_so_far = sums[names.index("loss")].item() / pos.epoch_steps
            progress.set_postfix(loss=f"{loss_so_far:.4f}")
            tracker.log_step(pos.step, {f"train/{k}": v for k, v in zip(names, means.tolist())})
            window, window_steps = None, 0
        if stopping:
            break
    if sums is not None and cluster.distributed:  # the epoch's sums: the mean over processes
        sums = cluster.sum_(sums.clone()) / cluster.world_size
    pos.sums = dict(zip(names, sums.tolist())) if sums is not None else {}


def careful_step(model, loss_fn, optimizer, x, y, pos: Position, trainer: TrainerConfig):
    """An eager step that checks the loss and gradients before updating (a host sync): a
    non-finite step is skipped (no update, BatchNorm statistics restored) and counted, up to
    trainer.skip_nonfinite times. Returns the terms, or None when the step was skipped."""
    saved_buffers = [b.clone() for b in model.buffers()]
    optimizer.zero_grad(set_to_none=True)
    terms = loss_and_gradients(
        model, model, loss_fn, x, y, trainer.precision, trainer.channels_last
    )
    if (torch.isfinite(terms["loss"]) & torch.isfinite(terms["grad_norm"])).item():
        optimizer.step()
        return terms
    pos.skipped += 1
    for b, saved in zip(model.buffers(), saved_buffers):
        b.copy_(saved)
    log.warning("skipped non-finite step %d: %s", pos.step + 1, describe(terms))
    if pos.skipped > trainer.skip_nonfinite:
        raise NonFiniteLoss(nonfinite_message(pos.step + 1, terms, trainer))
    return None


def stopped(last_good: Path | None) -> str:
    """The end of a NonFiniteLoss message: what is kept."""
    kept = (
        f"The last good checkpoint is kept: {last_good}."
        if last_good is not None
        else "No checkpoint had been written yet."
    )
    return f"Training stopped. {kept}"


def check_epoch(
    epoch: int,
    pos: Position,
    num_batches: int,
    val_terms: dict[str, float],
    trainer: TrainerConfig,
    last_good: Path | None,
) -> None:
    """Before an epoch is logged or saved: it must have taken a step (trainer.skip_nonfinite
    may have skipped them all) and its validation loss must be finite; otherwise the run stops
    (NonFiniteLoss) and neither metrics.jsonl nor the checkpoints get this epoch."""
    if pos.epoch_steps == 0:
        problem = (
            f"Epoch {epoch} took no training step: all {num_batches} of its steps had a "
            f"non-finite loss or gradient and were skipped (trainer.skip_nonfinite="
            f"{trainer.skip_nonfinite}; {pos.skipped} skipped in all), so the weights did not "
            "change."
        )
    elif not math.isfinite(val_terms["loss"]):
        values = ", ".join(f"{k}={v:.6g}" for k, v in val_terms.items())
        problem = (
            f"Epoch {epoch} ended with a non-finite validation loss ({values}): the weights "
            f"diverged ({pos.skipped} non-finite steps skipped so far)."
        )
    else:
        return
    raise NonFiniteLoss(
        f"{problem} {stopped(last_good)} Lower optim.optimizer.lr (or the growth of the "
        "learning-rate schedule, optim.scheduler); skipping more steps cannot help."
    )


def describe(terms: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in terms.items())


def nonfinite_message(step: int, terms: dict[str, torch.Tensor], trainer: TrainerConfig) -> str:
    return (
        f"Non-finite loss or gradient at step {step}: {describe(terms)}. Lower "
        f"optim.optimizer.lr, or let trainer.skip_nonfinite (now {trainer.skip_nonfinite}) "
        "skip such steps."
    )


@torch.no_grad()
def validate(
    model: VAE,
    loss_fn: VAELoss,
    batches: Batches,
    seed: int,
    precision: str = "fp32",
    channels_last: bool = False,
    cluster: Cluster | None = None,
) -> dict[str, float]:
    """Mean loss terms per example over the validation batches: the training objective (at
    the training precision, at the current KL weight), with the model in eval mode and the
    posterior noise drawn from a generator seeded with `seed`, so the same weights always give
    the same numbers. In a distributed run each process takes its share of the batches and
    the sums are all-reduced."""
    cluster = cluster or Cluster()
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed + cluster.rank)
    sums: dict[str, torch.Tensor] = {}
    seen = torch.zeros((), device=device)
    for x, y in batches:
        terms = forward_loss(model, loss_fn, x, y, precision, channels_last, generator)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0) + v * x.shape[0]
        seen += x.shape[0]
    names = list(sums)
    totals = cluster.sum_(torch.stack([sums[k] for k in names] + [seen]))
    return dict(zip(names, (totals[:-1] / totals[-1]).tolist()))


def checkpoint_state(
    model, optimizer, scheduler, pos, config, metrics, data, tracker, loss_fn
) -> dict:
    """Everything a checkpoint holds (plain tensors and containers: weights_only-loadable)."""
    return {
        "model": model.state_dict(),
        "loss": loss_fn.state_dict(),  # KL schedule / capacity state
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "position": asdict(pos),
        "epoch": pos.epoch,
        "step": pos.step,
        "config": config,
        "metrics": metrics,
        "rng": rng_state(data.train.generator),
        "wandb_id": tracker.wandb_id,
    }


def resume_from(
    path: Path,
    config: dict,
    epochs: int,
    run_dir: Path | None,
    model,
    optimizer,
    scheduler,
    data,
    loss_fn: VAELoss,
) -> tuple[Position, str | None, list[dict]]:
    """Load the checkpoint at `path` into the model, optimizer, scheduler, loss (its KL
    schedule) and RNGs; returns its Position, W&B run id and the metrics of the epochs it
    completed. The old run's best.pt is copied into `run_dir` (None: copy nothing), so the
    best model so far stays with the run."""
    state = load_checkpoint(path)
    differences = config_differences(state["config"], config)
    if differences:
        raise ConfigError(
            f"Invalid config: trainer.resume: {path} was made for another experiment "
            f"({'; '.join(differences[:5])}). Resume with the same settings, or start a new run."
        )
    if state["epoch"] >= epochs:
        raise ConfigError(
            f"Invalid config: trainer.resume: {path} has already trained {state['epoch']} "
            f"epochs; allowed: trainer.epochs > {state['epoch']} to train it further."
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    loss_fn.load_state_dict(state.get("loss") or {})
    restore_rng(state["rng"], data.train.generator)
    pos = Position(**state["position"])
    old_dir = path.parent.parent
    history = []
    if (old_dir / "metrics.jsonl").is_file():
        for line in (old_dir / "metrics.jsonl").read_text().splitlines():
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    history = [m for m in history if m.get("epoch", math.inf) <= pos.epoch]
    best = old_dir / "checkpoints" / "best.pt"
    if run_dir is not None and best.is_file() and old_dir.resolve() != run_dir.resolve():
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy2(best, run_dir / "checkpoints" / "best.pt")
    log.info(
        "resuming %s: epoch %d done, %d batches into the next, step %d",
        path,
        pos.epoch,
        pos.batches_done,
        pos.step,
    )
    return pos, state.get("wandb_id"), history


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


def check_labels(data, num_classes: int) -> None:
    """A conditional model needs every label in [0, num_classes): checked once, here."""
    if not num_classes:
        return
    for role, batches in (("train", data.train), ("val", data.val)):
        labels = getattr(batches, "labels", None)
        if labels is None:  # a DataLoader split: its file list's labels
            dataset = batches.dataset
            while not hasattr(dataset, "labels") and hasattr(dataset, "dataset"):
                dataset = dataset.dataset  # a wrapper (binarized images)
            if hasattr(dataset, "labels"):
                labels = torch.as_tensor(dataset.labels)
            else:  # a TensorDataset of images and labels
                labels = dataset.tensors[1]
        if len(labels) and not (int(labels.min()) >= 0 and int(labels.max()) < num_classes):
            raise ConfigError(
                f"Invalid config: model.num_classes={num_classes} but the {role} split has "
                f"labels {int(labels.min())}..{int(labels.max())}; allowed: model.num_classes > "
                f"{int(labels.max())}."
            )


def make_step(
    model, loss_fn, optimizer, trainer, device, captured: bool, cluster, batch_size: int
) -> Step:
    """The training step the trainer settings ask for: replayed from a CUDA graph, or eager
    (through DDP when distributed; with torch.compile'd forward when trainer.compile is set)."""
    set_capturable(optimizer, captured)
    if captured:
        return CapturedStep(
            model,
            loss_fn,
            optimizer,
            trainer.precision,
            trainer.channels_last,
            batch_size,
            required=trainer.cuda_graph is True,
        )
    net = model
    if trainer.compile:
        mode = None if trainer.compile == "default" else trainer.compile
        model.compile(mode=mode)  # in place: state_dict keys stay the same
    if cluster.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return eager_step(net, model, loss_fn, optimizer, trainer.precision, trainer.channels_last)


def describe_step(trainer: TrainerConfig, captured: bool, cluster: Cluster, optimizer) -> str:
    parts = ["CUDA graph" if captured else "eager", trainer.precision]
    if optimizer.defaults.get("fused"):
        parts.append(f"fused {type(optimizer).__name__}")
    if trainer.compile:
        parts.append(f"torch.compile({trainer.compile})")
    if trainer.channels_last:
        parts.append("channels_last")
    if cluster.distributed:
        parts.append(f"DDP x{cluster.world_size}")
    return ", ".join(parts)


def pictures(model: VAE, fixed_z, fixed_x, fixed_y, trainer: TrainerConfig, loss_fn: VAELoss):
    """The epoch's picture grids: prior samples from the fixed z (for a conditional model one
    row per class), and fixed validation images over their reconstructions (posterior mean)."""
    model.eval()
    with torch.no_grad():
        if model.num_classes:
            per_class = trainer.sample_grid
            z = fixed_z[:per_class].repeat(model.num_classes, 1)
            y = torch.arange(model.num_classes, device=z.device).repeat_interleave(per_class)
            samples = model.to_image(model.decode(z, y))
        else:
            per_class = trainer.sample_grid
            samples = model.to_image(model.decode(fixed_z))
        recons = model.to_image(model.decode(model.encode(fixed_x, fixed_y).mu, fixed_y))
    value_range = loss_fn.pixel_range
    yield "samples", image_grid(samples, per_class, value_range)
    yield "reconstructions", image_grid(torch.cat([fixed_x, recons]), len(fixed_x), value_range)


def run(cfg: DictConfig, run_dir: Path, labels: RunLabels | None = None) -> float:
    """Train the experiment described by `cfg`, writing outputs to `run_dir`.
    Returns the best validation loss (what sweepers minimise). From the start, SIGTERM /
    SIGINT / SIGUSR2 stop the run cleanly at the next step or epoch boundary."""
    with StopRequest() as stop:
        cluster, device = start_cluster(str(cfg.trainer.get("device", "auto")))
        try:
            if cluster.is_main:  # one run per folder (rank 0 alone writes files)
                claim_run_dir(run_dir)
            return _run(cfg, run_dir, labels, stop, cluster, device)
        finally:
            if cluster.is_main:
                release_run_dir(run_dir)
            cluster.close()


def _run(
    cfg: DictConfig,
    run_dir: Path,
    labels: RunLabels | None,
    stop: StopRequest,
    cluster: Cluster,
    cluster_device: torch.device | None,
) -> float:
    # 1. Check and build everything before any data is loaded or step taken.
    data_cfg = read_data(cfg.data)
    check_model_matches_data(cfg.model, data_cfg)
    trainer = read_trainer(cfg.trainer)
    logger_cfg = read_logger(cfg.logger)
    eval_settings = read_eval(cfg.get("eval"))
    device = cluster_device or resolve_device(trainer.device)
    torch.manual_seed(trainer.seed)
    loss_fn = instantiate_checked(cfg.loss, "loss")
    model = build_model(cfg, loss_fn).to(device)
    if trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(cfg, model, trainer.epochs)
    captured = use_cuda_graph(trainer, device, optimizer, cluster.distributed)
    config = OmegaConf.to_container(cfg, resolve=True)
    resume_path = None
    if trainer.resume is not None:
        roots = [Path.cwd() / "outputs", Path.cwd() / "multirun"]
        if cluster.is_main:
            resume_path = find_resume_checkpoint(
                trainer.resume, config, run_dir, roots, trainer.epochs
            )
        resume_path = cluster.broadcast(resume_path)
        if resume_path is None:
            log.info("trainer.resume=auto: no unfinished run of this experiment; starting anew")
    if cluster.distributed and trainer.skip_nonfinite:
        raise ConfigError(
            f"Invalid config: trainer.skip_nonfinite={trainer.skip_nonfinite} with torchrun; "
            "allowed: 0 (processes cannot skip a step on their own under DDP)."
        )
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

    pos, wandb_id, history = Position(), None, []
    if resume_path is not None:
        pos, wandb_id, history = resume_from(
            resume_path,
            config,
            trainer.epochs,
            run_dir if cluster.is_main else None,
            model,
            optimizer,
            scheduler,
            data,
            loss_fn,
        )
    loss_fn.to(device)
    if cluster.distributed:  # each process draws its own posterior noise
        torch.manual_seed(trainer.seed + 1009 * cluster.rank + pos.step)
    step = make_step(
        model, loss_fn, optimizer, trainer, device, captured, cluster, data.train.batch_size
    )
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "%s: %.2fM parameters on %s%s; %d train / %d val images; step: %s; outputs in %s",
        type(model).__name__,
        n_params / 1e6,
        device,
        f" (rank {cluster.rank} of {cluster.world_size})" if cluster.distributed else "",
        data.train.num_examples,
        data.val.num_examples,
        describe_step(trainer, captured, cluster, optimizer),
        run_dir,
    )

    # 2. Fixed inputs for the picture grids, so every epoch's grids are comparable.
    grid_gen = torch.Generator().manual_seed(trainer.seed)
    fixed_z = torch.randn(trainer.sample_grid**2, model.latent_dim, generator=grid_gen).to(device)
    fixed_x, fixed_y = (t[: trainer.num_reconstructions] for t in next(iter(data.val)))
    checkpoints = run_dir / "checkpoints"
    last_good = resume_path  # the newest checkpoint with finite weights
    epoch_metrics: list[dict] = []  # this process's epochs (history holds earlier ones)

    # 3. Epochs: train, validate, log, draw, checkpoint.
    tracker = Tracker(run_dir, config, logger_cfg, history, wandb_id, labels, write=cluster.is_main)
    try:
        while pos.epoch < trainer.epochs:
            epoch = pos.epoch + 1
            start = time.perf_counter()
            data_rng = data.train.generator.get_state()  # this epoch's order, for resuming
            if not cluster.any(stop.signal_name is not None, device):
                bar = tqdm(
                    total=len(data.train),
                    initial=pos.batches_done,
                    desc=f"Epoch {epoch}/{trainer.epochs}",
                    disable=not (trainer.progress and cluster.is_main),
                    dynamic_ncols=True,
                )
                with bar:
                    try:
                        train_epoch(
                            step,
                            model,
                            loss_fn,
                            optimizer,
                            data.train,
                            tracker,
                            pos,
                            trainer,
                            bar,
                            stop,
                            cluster,
                        )
                    except NonFiniteLoss as e:
                        raise NonFiniteLoss(f"{e} {stopped(last_good)}") from None
            if cluster.any(stop.signal_name is not None, device):  # during or before the epoch
                state = checkpoint_state(
                    model, optimizer, scheduler, pos, config, None, data, tracker, loss_fn
                )
                state["rng"]["data"] = data_rng  # replay this epoch's order on resume
                if cluster.is_main:
                    save_checkpoint(checkpoints / "last.pt", state)
                signal_number = stop.signal_number or 15  # another process got the signal
                stop.signal_name = stop.signal_name or "SIGTERM"
                code = 128 + signal_number
                tracker.finish(exit_code=code, preempted=True)
                stop.hand_over()  # under submitit (SIGUSR2): requeue this job, then exit
                raise Preempted(
                    f"Stopped by {stop.signal_name} in epoch {epoch} after step {pos.step}; "
                    f"checkpoint {checkpoints / 'last.pt'} holds that step. Continue with "
                    f"trainer.resume={run_dir}",
                    signal_number,
                )
            train_terms = {k: v / max(pos.epoch_steps, 1) for k, v in pos.sums.items()}
            cluster.share_buffers(model)
            val_terms = validate(
                model,
                loss_fn,
                data.val,
                trainer.seed,
                trainer.precision,
                trainer.channels_last,
                cluster,
            )
            check_epoch(epoch, pos, len(data.train), val_terms, trainer, last_good)
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()
            seconds = time.perf_counter() - start
            pos.epoch, pos.batches_done, pos.epoch_steps, pos.sums = epoch, 0, 0, {}
            metrics = {
                "epoch": epoch,
                "step": pos.step,
                **{f"train/{k}": v for k, v in train_terms.items()},
                **{f"val/{k}": v for k, v in val_terms.items()},
                "lr": lr,
                "skipped_steps": pos.skipped,
                "seconds": seconds,
            }
            if device.type == "cuda":  # the most GPU memory tensors have held so far
                metrics["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            tracker.log_epoch(metrics)
            epoch_metrics.append(metrics)
            pos.best_val_loss, improved = (
                min(pos.best_val_loss, val_terms["loss"]),
                val_terms["loss"] < pos.best_val_loss,
            )
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

            if not cluster.is_main:
                continue  # rank 0 draws and writes
            for name, grid in pictures(model, fixed_z, fixed_x, fixed_y, trainer, loss_fn):
                tracker.log_image(epoch, name, grid)
            state = checkpoint_state(
                model, optimizer, scheduler, pos, config, metrics, data, tracker, loss_fn
            )
            if trainer.checkpoint.save_last:
                save_checkpoint(checkpoints / "last.pt", state)
                last_good = checkpoints / "last.pt"
            if improved and trainer.checkpoint.save_best:
                save_checkpoint(checkpoints / "best.pt", state)
        if stop.signal_name is not None:
            log.info("%s arrived after the last step: the run is complete", stop.signal_name)
        done = [m for m in history if "val/loss" in m] + epoch_metrics
        best = min(done, key=lambda m: m["val/loss"])
        tracker.summarize(
            {
                "epochs": pos.epoch,
                "seconds_per_epoch": sum(m["seconds"] for m in done) / len(done),
                **{f"best/{k}": v for k, v in best.items() if k.startswith("val/")},
                "best/epoch": best["epoch"],
            }
        )
        if eval_settings.enabled and cluster.is_main:
            try:
                results = run_evaluation(
                    model,
                    loss_fn,
                    cfg,
                    eval_settings,
                    run_dir,
                    pos.epoch,
                    stop=stop,
                    progress=trainer.progress,
                    final=True,
                    source=f"the final model (epoch {pos.epoch})",
                )
            except EvaluationStopped as e:  # not handed to submitit: a requeue would retrain
                raise Preempted(
                    f"{e}. Training is complete and its checkpoints are kept ({checkpoints}). "
                    f"Evaluate later with: python -m vae_exp.evaluate {run_dir}",
                    e.signal_number,
                ) from None
            tracker.summarize(flat_metrics(results))
    except BaseException as e:
        tracker.finish(exit_code=getattr(e, "exit_code", 1), preempted=isinstance(e, Preempted))
        raise
    tracker.finish(exit_code=0)
    return pos.best_val_loss
