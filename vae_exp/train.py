"""The training loop, read top to bottom: `fit` checks and builds the experiment, trains epoch
after epoch (train, stop if asked, validate, log, pictures, checkpoint), then finishes and
evaluates. `train_epoch` and `validate` are its two passes over the data; the parts it uses
are built in vae_exp.build, saved and resumed in vae_exp.checkpoint."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from vae_exp.build import Experiment, build_experiment, describe_experiment
from vae_exp.checkpoint import (
    CheckpointWriter,
    Position,
    checkpoint_state,
    resume_or_start,
    save_checkpoint,
    snapshot,
)
from vae_exp.config import read_trainer
from vae_exp.distributed import start_cluster
from vae_exp.evaluate import EvaluationStopped, flat_metrics, run_evaluation, sample_grids
from vae_exp.outputs import claimed, resume_command
from vae_exp.preemption import StopRequest
from vae_exp.steps import Step, forward_loss, make_step
from vae_exp.tracking import RunLabels, Tracker

log = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """Training stopped early, after saving what could be saved; `exit_code` for the shell."""

    exit_code = 1


class Preempted(TrainingStopped):
    """SIGTERM / SIGINT / SIGUSR2: a checkpoint of the current step was written."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


class NonFiniteLoss(TrainingStopped):
    """A NaN or Inf loss or gradient (more than trainer.skip_nonfinite of them), an epoch
    without a single step, or a non-finite validation loss."""

    exit_code = 3


def fit(cfg: DictConfig, run_dir: Path, labels: RunLabels | None = None) -> float:
    """Train the experiment described by `cfg`, writing its outputs to `run_dir`; returns the
    best validation loss (what sweepers minimise). From the start, SIGTERM / SIGINT / SIGUSR2
    stop the run cleanly at the next step (or during the final evaluation)."""
    device_setting = read_trainer(cfg.trainer).device  # how this process joins torchrun
    with (
        StopRequest() as stop,
        start_cluster(device_setting) as (cluster, device),
        claimed(run_dir, cluster.is_main),  # one run per folder; rank 0 alone writes
    ):
        # 1. Check and build everything, then resume where trainer.resume says.
        exp = build_experiment(cfg, cluster, device)
        trainer, data = exp.trainer, exp.data
        start = resume_or_start(exp, run_dir)
        pos = start.position
        if cluster.distributed:  # each process draws its own posterior noise
            torch.manual_seed(trainer.seed + 1009 * cluster.rank + pos.step)
        step, step_description = make_step(
            exp.model,
            exp.loss_fn,
            exp.optimizer,
            trainer=trainer,
            cluster=cluster,
            batch_size=data.train.batch_size,
        )
        log.info("%s; step: %s; outputs in %s", describe_experiment(exp), step_description, run_dir)
        tracker = Tracker(
            run_dir, exp.config, exp.logger, start.history, start.wandb_id, labels, cluster.is_main
        )
        fixed_x, fixed_y = (t[: trainer.num_reconstructions] for t in next(iter(data.val)))
        done = [m for m in start.history if "val/loss" in m]  # the metrics of finished epochs
        # writes checkpoints while the next epoch trains; knows the newest good one
        writer = CheckpointWriter(written=start.checkpoint)
        try:
            # 2. Epochs: train, stop if asked, validate, pictures, checkpoint, log.
            while pos.epoch < trainer.epochs:
                epoch, began = pos.epoch + 1, time.perf_counter()
                data_rng = data.train.generator.get_state()  # this epoch's order, for resuming
                if not cluster.any(stop.requested, device):
                    train_epoch(exp, step, pos, tracker, stop, writer)
                if cluster.any(stop.requested, device):  # during or before the epoch
                    save_and_stop(exp, pos, data_rng, tracker, stop, run_dir, writer)
                train_terms = {k: v / max(pos.epoch_steps, 1) for k, v in pos.sums.items()}
                cluster.share_buffers(exp.model)
                val_terms = validate(exp)
                writer.wait()  # the previous epoch's write (usually done long since)
                check_epoch(exp, epoch, pos, val_terms, writer.written)
                lr = exp.optimizer.param_groups[0]["lr"]
                if exp.scheduler is not None:
                    exp.scheduler.step()
                pos.epoch, pos.batches_done, pos.epoch_steps, pos.sums = epoch, 0, 0, {}
                improved = val_terms["loss"] < pos.best_val_loss
                pos.best_val_loss = min(pos.best_val_loss, val_terms["loss"])
                if cluster.is_main:  # rank 0 draws and writes
                    grids = sample_grids(
                        exp.model,
                        fixed_x,
                        fixed_y,
                        trainer.sample_grid,
                        trainer.seed,
                        exp.loss_fn.pixel_range,
                    )
                    for name, grid in grids.items():
                        tracker.log_image(epoch, name, grid)
                    state = snapshot(checkpoint_state(exp, pos, None, tracker.wandb_id))
                # The epoch's seconds: training, validation, pictures and the checkpoint's
                # hand-off to the writer (its writing overlaps the next epoch).
                metrics = epoch_metrics(exp, pos, train_terms, val_terms, lr, began)
                if cluster.is_main:
                    state["metrics"] = metrics
                    last = run_dir / "checkpoints" / "last.pt"
                    writer.submit(
                        state,
                        last if trainer.checkpoint.save_last else None,
                        run_dir / "checkpoints" / "best.pt"
                        if improved and trainer.checkpoint.save_best
                        else None,
                    )
                tracker.log_epoch(metrics)
                log_epoch_line(metrics, trainer.epochs)
                done.append(metrics)
            writer.wait()  # the last checkpoint is on disk before the run is called done

            # 3. Finish: the run's summary, then the evaluation of the final model.
            if stop.requested:
                log.info("%s arrived after the last step: the run is complete", stop.signal_name)
            tracker.summarize(run_summary(done, pos))
            if exp.evaluation.enabled and cluster.is_main:
                results = final_evaluation(exp, pos, stop, run_dir)
                tracker.summarize(flat_metrics(results))
        except BaseException as e:
            finish_writing(writer)
            preempted = isinstance(e, Preempted)
            tracker.finish(exit_code=getattr(e, "exit_code", 1), preempted=preempted)
            raise
        tracker.finish(exit_code=0)
        return pos.best_val_loss


def kept_after_writes(writer: CheckpointWriter | None) -> Path | None:
    """The newest good checkpoint once the pending write has landed: what a run that stops
    now keeps (None without a writer, or before any checkpoint)."""
    if writer is None:
        return None
    finish_writing(writer)
    return writer.written


def finish_writing(writer: CheckpointWriter) -> None:
    """On the way out of an error: let the pending checkpoint write finish (its own failure
    is logged; the error that stopped the run is the one raised)."""
    try:
        writer.wait()
    except Exception as e:
        log.error("%s", e)


def train_epoch(
    exp: Experiment,
    step: Step,
    pos: Position,
    tracker: Tracker,
    stop: StopRequest,
    writer: CheckpointWriter | None = None,
) -> None:
    """Train on the batches of one epoch from batch `pos.batches_done` on, updating `pos`.
    `step(x, y)` is the training step make_step built: it returns the loss terms, or None
    when it skipped a non-finite step (trainer.skip_nonfinite: up to that many in a run).

    Loss terms are summed on the device and read back only every `log_every` steps (no host
    sync per step). A non-finite loss or gradient stops training (`NonFiniteLoss`, naming the
    first such step and the checkpoint kept, `writer`'s newest). Returns early, after a whole
    step, when `stop` has caught a signal (in every process of a distributed run: they agree
    at the log points). At the log points a failed background checkpoint write (`writer`)
    stops the run with its error."""
    trainer, cluster, batches = exp.trainer, exp.cluster, exp.data.train
    exp.model.train()
    device = exp.device
    # The terms as one vector each step (a few kernel launches, not a few per term), summed
    # over the epoch and over the current log window, in the fixed order of `names`.
    names = list(pos.sums)
    sums = torch.tensor([pos.sums[k] for k in names], device=device) if names else None
    window, window_steps = None, 0
    first_bad = torch.tensor(-1, device=device)  # global step of the first non-finite step
    bad = None  # the terms of that step
    bar = tqdm(
        total=len(batches),
        initial=pos.batches_done,
        desc=f"Epoch {pos.epoch + 1}/{trainer.epochs}",
        disable=not (trainer.progress and cluster.is_main),
        dynamic_ncols=True,
    )
    with bar:
        for x, y in batches.iterate(start=pos.batches_done):
            exp.loss_fn.at_step(pos.step)  # KL schedules follow the optimizer step
            terms = step(x, y)
            pos.batches_done += 1
            bar.update(1)
            if terms is None:  # a skipped non-finite step
                pos.skipped += 1
                if pos.skipped > trainer.skip_nonfinite:
                    good = kept_after_writes(writer)
                    raise NonFiniteLoss(nonfinite_message(pos.step + 1, None, trainer, good))
            else:
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
            at_log_point = window_steps == trainer.log_every or pos.batches_done == len(batches)
            if cluster.distributed:  # processes stop together, deciding at the log points
                stopping = at_log_point and cluster.any(stop.requested, device)
            else:
                stopping = stop.requested
            if window_steps and (at_log_point or stopping):
                if writer is not None:
                    writer.check()
                if first_bad.item() >= 0:
                    bad_terms = dict(zip(names, bad.tolist()))
                    good = kept_after_writes(writer)
                    raise NonFiniteLoss(
                        nonfinite_message(first_bad.item(), bad_terms, trainer, good)
                    )
                means = cluster.sum_(window.clone()) / (cluster.world_size * window_steps)
                bar.set_postfix(loss=f"{sums[names.index('loss')].item() / pos.epoch_steps:.4f}")
                tracker.log_step(pos.step, {f"train/{k}": v for k, v in zip(names, means.tolist())})
                window, window_steps = None, 0
            if stopping:
                break
    if sums is not None and cluster.distributed:  # the epoch's sums: the mean over processes
        sums = cluster.sum_(sums.clone()) / cluster.world_size
    pos.sums = dict(zip(names, sums.tolist())) if sums is not None else {}


@torch.no_grad()
def validate(exp: Experiment) -> dict[str, float]:
    """Mean loss terms per example over the validation images: the training objective (at the
    training precision, at the current KL weight), with the model in eval mode, in batches of
    data.val_batch_size. Every image gets the same posterior noise each time
    (`validation_noise`), so the numbers depend on the weights alone, not on the batch size,
    the device or the number of processes. In a distributed run each process takes its share
    of the images and the sums are all-reduced."""
    model, trainer, cluster, batches = exp.model, exp.trainer, exp.cluster, exp.data.val
    model.eval()
    noise = validation_noise(exp)
    sums: dict[str, torch.Tensor] = {}
    seen, done = torch.zeros((), device=exp.device), 0
    for x, y in batches:
        # this process's images are batches.rank, rank + world_size, ... (Batches.shard)
        index = batches.rank + batches.world_size * torch.arange(done, done + len(x))
        eps = noise[index.to(noise.device)].transpose(0, 1)  # [samples, B, D]
        eps = eps[0] if exp.loss_fn.samples == 1 else eps
        terms = forward_loss(
            model, exp.loss_fn, x, y, trainer.precision, trainer.channels_last, eps=eps
        )
        for k, v in terms.items():
            sums[k] = sums.get(k, 0) + v * x.shape[0]
        seen += x.shape[0]
        done += len(x)
    names = list(sums)
    totals = cluster.sum_(torch.stack([sums[k] for k in names] + [seen]))
    return dict(zip(names, (totals[:-1] / totals[-1]).tolist()))


def validation_noise(exp: Experiment) -> torch.Tensor:
    """The posterior noise of every validation image, [images, samples, latent_dim] on the
    device: one draw from a CPU generator seeded with trainer.seed, made once per run."""
    shape = (exp.data.val.num_examples, exp.loss_fn.samples, exp.model.latent_dim)
    if exp.val_noise is None or exp.val_noise.shape != shape:
        generator = torch.Generator().manual_seed(exp.trainer.seed)
        exp.val_noise = torch.randn(shape, generator=generator).to(exp.device)
    return exp.val_noise


def save_and_stop(
    exp: Experiment,
    pos: Position,
    data_rng: torch.Tensor,
    tracker: Tracker,
    stop: StopRequest,
    run_dir: Path,
    writer: CheckpointWriter,
) -> NoReturn:
    """A signal arrived (in any process): once the pending epoch checkpoint is written,
    checkpoint the current step as last.pt (with the data order of the epoch it is in, to
    replay on resume), mark the W&B run preempted, hand the signal on (submitit requeues the
    job on SIGUSR2) and stop (`Preempted`)."""
    last = run_dir / "checkpoints" / "last.pt"
    state = checkpoint_state(exp, pos, None, tracker.wandb_id)
    state["rng"]["data"] = data_rng
    finish_writing(writer)  # then this newer state replaces it
    if exp.cluster.is_main:
        save_checkpoint(last, state)
    signal_number = stop.signal_number or 15  # another process got the signal
    stop.signal_name = stop.signal_name or "SIGTERM"
    tracker.finish(exit_code=128 + signal_number, preempted=True)
    stop.hand_over()  # under submitit (SIGUSR2): requeue this job, then exit
    raise Preempted(
        f"Stopped by {stop.signal_name} in epoch {pos.epoch + 1} after step {pos.step}; "
        f"checkpoint {last} holds that step. Continue with: {resume_command(run_dir)}",
        signal_number,
    )


def check_epoch(
    exp: Experiment, epoch: int, pos: Position, val_terms: dict[str, float], last_good
) -> None:
    """Before an epoch is logged or saved: it must have taken a step (trainer.skip_nonfinite
    may have skipped them all) and its validation loss must be finite; otherwise the run stops
    (NonFiniteLoss) and neither metrics.jsonl nor the checkpoints get this epoch."""
    if pos.epoch_steps == 0:
        problem = (
            f"Epoch {epoch} took no training step: all {len(exp.data.train)} of its steps had "
            f"a non-finite loss or gradient and were skipped (trainer.skip_nonfinite="
            f"{exp.trainer.skip_nonfinite}; {pos.skipped} skipped in all), so the weights did "
            "not change."
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
        f"{problem} {kept(last_good)} Lower optim.optimizer.lr (or the growth of the "
        "learning-rate schedule, optim.scheduler); skipping more steps cannot help."
    )


def kept(last_good: Path | None) -> str:
    """The end of a NonFiniteLoss message: what is kept."""
    if last_good is None:
        return "Training stopped. No checkpoint had been written yet."
    return f"Training stopped. The last good checkpoint is kept: {last_good}."


def nonfinite_message(step: int, terms: dict[str, float] | None, trainer, last_good) -> str:
    """Why training stopped at non-finite step `step` (its terms, when known)."""
    values = ", ".join(f"{k}={v:.6g}" for k, v in terms.items()) if terms else "see above"
    return (
        f"Non-finite loss or gradient at step {step}: {values}. Lower optim.optimizer.lr, or "
        f"let trainer.skip_nonfinite (now {trainer.skip_nonfinite}) skip such steps. "
        f"{kept(last_good)}"
    )


def epoch_metrics(
    exp: Experiment, pos: Position, train_terms, val_terms, lr: float, began: float
) -> dict[str, Any]:
    """The epoch's line of metrics.jsonl (and of W&B)."""
    metrics = {
        "epoch": pos.epoch,
        "step": pos.step,
        **{f"train/{k}": v for k, v in train_terms.items()},
        **{f"val/{k}": v for k, v in val_terms.items()},
        "lr": lr,
        "skipped_steps": pos.skipped,
        "seconds": time.perf_counter() - began,
    }
    if exp.device.type == "cuda":  # the most GPU memory tensors have held so far
        metrics["gpu_peak_mib"] = torch.cuda.max_memory_allocated(exp.device) / 2**20
    return metrics


def log_epoch_line(m: dict[str, Any], epochs: int) -> None:
    log.info(
        "epoch %d/%d  train loss %.5f (recon %.5f, kld %.3f)  "
        "val loss %.5f (recon %.5f, kld %.3f)  %.1fs",
        m["epoch"],
        epochs,
        m["train/loss"],
        m["train/recon"],
        m["train/kld"],
        m["val/loss"],
        m["val/recon"],
        m["val/kld"],
        m["seconds"],
    )


def run_summary(done: list[dict[str, Any]], pos: Position) -> dict[str, Any]:
    """The W&B summary of the finished epochs: their count, seconds per epoch, and the best
    validation values with their epoch."""
    best = min(done, key=lambda m: m["val/loss"])
    return {
        "epochs": pos.epoch,
        "seconds_per_epoch": sum(m["seconds"] for m in done) / len(done),
        **{f"best/{k}": v for k, v in best.items() if k.startswith("val/")},
        "best/epoch": best["epoch"],
    }


def final_evaluation(exp: Experiment, pos: Position, stop: StopRequest, run_dir: Path) -> dict:
    """The evaluation of the final model on the test split (vae_exp.evaluate); a signal stops
    it as `Preempted`, keeping the training's checkpoints (not handed to submitit: a requeued
    job would train again)."""
    try:
        return run_evaluation(
            exp.model,
            exp.loss_fn,
            exp.cfg,
            exp.evaluation,
            run_dir,
            pos.epoch,
            stop=stop,
            progress=exp.trainer.progress,
            final=True,
            source=f"the final model (epoch {pos.epoch})",
        )
    except EvaluationStopped as e:
        raise Preempted(
            f"{e}. Training is complete and its checkpoints are kept "
            f"({run_dir / 'checkpoints'}). Evaluate later with: python -m vae_exp.evaluate "
            f"{run_dir}",
            e.signal_number,
        ) from None
