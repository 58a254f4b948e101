"""Numbers a paper can quote, for a trained model on the test split:

    python -m vae_exp.evaluate <run dir or checkpoint> [--k 5000] [--limit N] [--device cuda]

- the negative ELBO per image in nats, with its reconstruction and KL parts, for the loss's
  likelihood: Bernoulli (`bce_kld`), or for `mse_kld` a Gaussian decoder with the fixed std
  implied by the loss weight (sigma^2 = w * pixels / 2; stated in the output);
- the importance-sampled estimate of log p(x) (Burda et al. 2015) with exactly k samples;
- reconstruction MSE in pixel space ([0, 1] pixel values, from the posterior mean);
- active units (latent dims whose Cov_x(E_q[z|x]) > 0.01) and the KL of each latent dim;
- pictures: samples, reconstructions, latent interpolations, and for a 2-D latent the decoded
  manifold.

Every evaluation is kept as <run dir>/eval/<split>-k<k>-n<images>-epoch<epoch>.json;
<run dir>/eval.json and eval/*.png are the most thorough one so far (see `more_thorough`).
Training runs the same evaluation at its end (`eval` in the config) and also appends its
eval/* line to metrics.jsonl and puts the numbers in the W&B summary. SIGTERM / SIGINT /
SIGUSR2 stop an evaluation within one chunk of samples (`EvaluationStopped`), writing nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from vae_exp.build import build_model, instantiate_checked
from vae_exp.checkpoint import CheckpointError, load_checkpoint
from vae_exp.config import ConfigError, EvalConfig, read_data, read_eval
from vae_exp.data import Batches, split_batches
from vae_exp.distributed import resolve_device
from vae_exp.likelihood import (
    active_units,
    elbo_parts,
    implied_gaussian_sigma,
    importance_sampled_log_likelihood,
    kl_per_dim,
)
from vae_exp.losses import VAELoss
from vae_exp.models import VAE
from vae_exp.preemption import StopRequest
from vae_exp.tracking import image_grid

log = logging.getLogger(__name__)

# eval.k=auto: importance samples per image. 1000 on CUDA (30 s for the reference conv VAE on
# all 10,000 test images on an H100; Burda et al.'s k=5000 costs 5x more: ask for it). Two CPU
# cores decode that model at 0.4-0.6 ms per image per sample, so k=1000 would take over an
# hour; k=10 keeps the final evaluation of a quick run within about its training time.
AUTO_K = {"cuda": 1000, "other": 10}
PAPER_K = 5000  # what the log-likelihoods of papers use (Burda et al. 2015)


def resolve_k(k: int | str, device: torch.device) -> int:
    """eval.k as a number: `auto` is AUTO_K for the device's type."""
    if k != "auto":
        return int(k)
    return AUTO_K["cuda" if device.type == "cuda" else "other"]


class EvaluationStopped(Exception):
    """A signal (SIGTERM, SIGINT, SIGUSR2) stopped an evaluation between two chunks of
    samples (a second Ctrl-C: within one); nothing was written. `exit_code`: 128 + signal."""

    def __init__(self, signal_name: str, signal_number: int, done: int, total: int) -> None:
        super().__init__(
            f"Stopped by {signal_name} during the evaluation, after {done} of {total} images; "
            "no evaluation results were written"
        )
        self.signal_name, self.signal_number = signal_name, signal_number
        self.exit_code = 128 + signal_number


def duration(seconds: float) -> str:
    """A duration for people: 0.4 s, 45 s, 3 min 20 s, 2 h 05 min."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def decoder_sigma(loss_fn: VAELoss, setting: float | str, pixels: int) -> tuple[float | None, str]:
    """The fixed std of a Gaussian decoder, and a sentence saying where it comes from."""
    if loss_fn.likelihood == "bernoulli":
        return None, "Bernoulli decoder"
    if setting != "implied":
        return float(setting), f"Gaussian decoder, fixed std sigma={setting} (eval.sigma)"
    if getattr(loss_fn, "sigma", None):
        return float(loss_fn.sigma), f"Gaussian decoder, fixed std sigma={loss_fn.sigma} (loss)"
    if loss_fn.w <= 0:
        raise ConfigError(
            "Invalid config: eval.sigma=implied needs loss.w > 0 (sigma^2 = w * pixels / 2); "
            "allowed: a number > 0 for eval.sigma."
        )
    sigma = implied_gaussian_sigma(loss_fn.w, pixels)
    return sigma, (
        f"Gaussian decoder with fixed std sigma={sigma:.6g} in the data's [-1, 1] units, the one "
        f"for which the MSE loss is proportional to the negative ELBO (sigma^2 = w * {pixels} "
        f"pixels / 2, w={loss_fn.w:g}); a density on continuous pixels, so nats can be negative"
    )


@torch.no_grad()
def evaluate(
    model: VAE,
    loss_fn: VAELoss,
    batches: Batches,
    settings: EvalConfig,
    generator: torch.Generator | None = None,
    stop: StopRequest | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The evaluation numbers (means per image over `batches`; see the module docstring).
    `settings.k` must be a number (`resolve_k`). Logs the expected duration after the first
    batch; `progress` shows a tqdm bar. Raises EvaluationStopped when `stop` has caught a
    signal (checked before every batch and every chunk of samples), or on a second Ctrl-C."""
    if not isinstance(settings.k, int):
        raise ValueError(f"k={settings.k!r}: resolve eval.k=auto with resolve_k first")
    model.eval()
    device = next(model.parameters()).device
    generator = generator or torch.Generator(device).manual_seed(settings.seed)
    x0, _ = next(iter(batches))
    pixels = x0[0].numel()
    sigma, decoder = decoder_sigma(loss_fn, settings.sigma, pixels)
    lo, hi = loss_fn.pixel_range
    sums = {"neg_elbo": 0.0, "recon_nll": 0.0, "kl": 0.0, "log_likelihood": 0.0, "mse": 0.0}
    means, kls = [], []
    n, total = 0, batches.num_examples

    def check() -> None:
        if stop is not None and stop.signal_name is not None:
            raise EvaluationStopped(stop.signal_name, stop.signal_number, n, total)

    start = time.perf_counter()
    bar = tqdm(total=total, desc="Evaluating", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        with bar:
            for x, y in batches:
                check()
                y = y if model.num_classes else None
                parts = elbo_parts(model, x, y, loss_fn.likelihood, sigma, generator)
                log_px = importance_sampled_log_likelihood(
                    model,
                    x,
                    y,
                    settings.k,
                    loss_fn.likelihood,
                    sigma,
                    settings.chunk,
                    generator,
                    before_chunk=check,  # a signal stops the evaluation within one chunk
                )
                posterior = model.encode(x, y)
                recon = model.to_image(model.decode(posterior.mu, y))
                mse = (((recon - x) / (hi - lo)) ** 2).flatten(1).mean(1)  # [0, 1] pixel units
                for key, value in (*parts.items(), ("log_likelihood", log_px), ("mse", mse)):
                    sums[key] += value.double().sum().item()
                means.append(posterior.mu.double().cpu())
                kls.append(kl_per_dim(posterior.mu, posterior.log_var).double().sum(0).cpu())
                if n == 0 and len(x) < total:
                    took = time.perf_counter() - start
                    bar.clear()  # the log line, then the bar below it
                    log.info(
                        "evaluation: the first %d images took %s; about %s for all %d",
                        len(x),
                        duration(took),
                        duration(took * total / len(x)),
                        total,
                    )
                n += len(x)
                bar.update(len(x))
    except KeyboardInterrupt:  # a second Ctrl-C (StopRequest): stop now, without a traceback
        raise EvaluationStopped("SIGINT", 2, n, total) from None
    count, variances = active_units(torch.cat(means))
    per_dim = (torch.stack(kls).sum(0) / n).tolist()
    return {
        "images": n,
        "likelihood": loss_fn.likelihood,
        "decoder": decoder,
        "sigma": sigma,
        "k": settings.k,
        "neg_elbo": sums["neg_elbo"] / n,
        "recon_nll": sums["recon_nll"] / n,
        "kl": sums["kl"] / n,
        "log_likelihood": sums["log_likelihood"] / n,
        "nll": -sums["log_likelihood"] / n,
        "mse": sums["mse"] / n,
        "active_units": count,
        "latent_dim": model.latent_dim,
        "kl_per_dim": per_dim,
        "posterior_mean_variance": variances.tolist(),
    }


@torch.no_grad()
def sample_grids(
    model: VAE,
    x: torch.Tensor,
    y: torch.Tensor,
    per_row: int,
    seed: int,
    value_range: tuple[float, float],
) -> dict[str, np.ndarray]:
    """The grids of training (every epoch) and evaluation alike (uint8 arrays): samples of the
    prior draws of a generator seeded with `seed` (a per_row x per_row grid; for a conditional
    model one row of per_row per class), and the images `x` (labels `y`) above their
    reconstructions from the posterior mean."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    if model.num_classes:
        samples = model.class_grid(per_row, generator)
    else:
        samples = model.sample(per_row * per_row, generator)
    recons = model.reconstruct(x, y if model.num_classes else None)
    return {
        "samples": image_grid(samples, per_row, value_range),
        "reconstructions": image_grid(torch.cat([x, recons]), len(x), value_range),
    }


@torch.no_grad()
def eval_pictures(
    model: VAE, batches: Batches, value_range: tuple[float, float], n: int = 8, steps: int = 10
) -> dict[str, np.ndarray]:
    """The evaluation's grids: `sample_grids` (n x n samples, n test images over their
    reconstructions), interpolations between the posterior means of pairs of test images (a
    row per pair, end images at both sides), and for a 2-D latent the decoded manifold over
    the prior's quantiles (Kingma & Welling 2013, figure 4)."""
    model.eval()
    device = next(model.parameters()).device
    x, y = next(iter(batches))
    x, y = x[: 2 * n], y[: 2 * n]
    grids = sample_grids(model, x[:n], y[:n], n, 0, value_range)
    y_or_none = y if model.num_classes else None
    pairs = min(n, len(x) // 2)
    if pairs:
        mu = model.encode(x, y_or_none).mu
        start, end = mu[:pairs], mu[pairs : 2 * pairs]
        t = torch.linspace(0, 1, steps, device=device)
        path = start[:, None] + t[None, :, None] * (end - start)[:, None]  # [pairs, steps, D]
        labels = None if y_or_none is None else y[:pairs].repeat_interleave(steps)
        decoded = model.to_image(model.decode(path.flatten(0, 1), labels))
        rows = decoded.unflatten(0, (pairs, steps))
        framed = torch.cat([x[:pairs, None], rows, x[pairs : 2 * pairs, None]], dim=1)
        grids["interpolations"] = image_grid(framed.flatten(0, 1), steps + 2, value_range)
    if model.latent_dim == 2 and not model.num_classes:
        side = 20
        q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, side))
        zz = torch.stack(torch.meshgrid(q, q.flip(0), indexing="xy"), dim=-1).reshape(-1, 2)
        decoded = model.to_image(model.decode(zz.to(device)))
        grids["manifold"] = image_grid(decoded, side, value_range)
    return grids


def save_pictures(grids: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, grid in grids.items():
        paths.append(folder / f"{name}.png")
        Image.fromarray(grid).save(paths[-1])
    return paths


def result_name(results: dict[str, Any], settings: EvalConfig) -> str:
    """The file name of one evaluation, from what its numbers depend on:
    test-k1000-n10000-epoch100.json (plus -sigma<s> for eval.sigma, -seed<s> for eval.seed)."""
    name = f"{results['split']}-k{results['k']}-n{results['images']}"
    if results.get("epoch") is not None:
        name += f"-epoch{results['epoch']}"
    if settings.sigma != "implied" and results["sigma"] is not None:
        name += f"-sigma{results['sigma']:g}"
    if settings.seed:
        name += f"-seed{settings.seed}"
    return name + ".json"


def thoroughness(results: dict[str, Any]) -> tuple[bool, int, int]:
    """How thorough an evaluation is: on the test split first, then more images, then more
    importance samples."""
    return results.get("split", "test") == "test", results["images"], results["k"]


def more_thorough(new: dict[str, Any], run_dir: Path) -> bool:
    """Whether `new` should be the run's eval.json: there is none (or it is unreadable), or
    `new` is at least as thorough (a tie goes to the newer evaluation)."""
    try:
        current = json.loads((run_dir / "eval.json").read_text())
        return thoroughness(new) >= thoroughness(current)
    except (OSError, ValueError, KeyError, TypeError):
        return True


def _write_json(path: Path, values: dict[str, Any]) -> None:
    """Write atomically: a temporary file renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    tmp.replace(path)


def write_results(
    run_dir: Path, results: dict[str, Any], name: str, pictures: dict[str, Any], final: bool
) -> list[Path]:
    """eval/<name>, and when it is the most thorough evaluation so far also eval.json and
    eval/*.png; `final` (training's own evaluation): one eval/* line appended to
    metrics.jsonl. Returns the paths written."""
    written = [run_dir / "eval" / name]
    if more_thorough(results, run_dir):
        results["pictures"] = [str(p) for p in save_pictures(pictures, run_dir / "eval")]
        written += [run_dir / "eval.json", *map(Path, results["pictures"])]
        _write_json(run_dir / "eval.json", results)
    _write_json(written[0], results)
    if final:
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(flat_metrics(results)) + "\n")
    return written


def flat_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The scalar results as eval/<name> (what metrics.jsonl and the W&B summary get)."""
    keys = ("neg_elbo", "recon_nll", "kl", "log_likelihood", "nll", "mse", "active_units", "k")
    out = {f"eval/{k}": results[k] for k in keys}
    out.update(
        {
            "eval/epoch": results.get("epoch"),
            "eval/images": results["images"],
            "eval/likelihood": results["likelihood"],
            "eval/sigma": results["sigma"],
        }
    )
    return out


def summary_line(r: dict[str, Any]) -> str:
    decoder = r["likelihood"] + (f", sigma={r['sigma']:.4g}" if r["sigma"] is not None else "")
    return (
        f"test ({r['images']} images, {decoder}): -ELBO {r['neg_elbo']:.3f} nats "
        f"(recon {r['recon_nll']:.3f} + KL {r['kl']:.3f}); -log p(x) (IS, k={r['k']}) "
        f"{r['nll']:.3f} nats; MSE {r['mse']:.5f}; active units {r['active_units']}/"
        f"{r['latent_dim']}"
    )


def eval_batches(cfg: DictConfig, settings: EvalConfig, pixel_range, device) -> Batches:
    """The evaluation split, prepared as validation data is (binarized data: a fixed draw)."""
    data_cfg = read_data(cfg.data)
    data_cfg = dataclasses.replace(
        data_cfg, limit=settings.limit, batch_size=settings.batch_size, download=False
    )
    return split_batches(data_cfg, "val", settings.split, pixel_range, device, seed=0)


def run_evaluation(
    model: VAE,
    loss_fn: VAELoss,
    cfg: DictConfig,
    settings: EvalConfig,
    run_dir: Path,
    epoch: int | None,
    stop: StopRequest | None = None,
    progress: bool = False,
    final: bool = False,
    source: str = "the final model of training",
) -> dict[str, Any]:
    """Evaluate and write the results into run_dir (`write_results`; `final`: training's own
    evaluation); returns them. Logs what it does first, and the summary at the end. Raises
    EvaluationStopped when `stop` catches a signal (nothing is written then)."""
    device = next(model.parameters()).device
    how_k = f" (eval.k=auto on {device.type})" if settings.k == "auto" else ""
    settings = dataclasses.replace(settings, k=resolve_k(settings.k, device))
    batches = eval_batches(cfg, settings, loss_fn.pixel_range, device)
    log.info(
        "evaluating %s on %d %s images: -ELBO, and -log p(x) with k=%d importance samples per "
        "image%s, on %s%s",
        source,
        batches.num_examples,
        settings.split,
        settings.k,
        how_k,
        device,
        f" (a paper-grade -log p(x): python -m vae_exp.evaluate {run_dir} --k {PAPER_K} on a GPU)"
        if settings.k < AUTO_K["cuda"]
        else "",
    )
    start = time.perf_counter()
    results = evaluate(model, loss_fn, batches, settings, stop=stop, progress=progress)
    results.update(
        {
            "epoch": epoch,
            "split": settings.split,
            "seconds": time.perf_counter() - start,
            "device": str(device),
            "seed": settings.seed,
            "chunk": settings.chunk,
            "weights": source,
        }
    )
    try:  # a second Ctrl-C from here on: no traceback either
        pictures = eval_pictures(model, batches, loss_fn.pixel_range)
        name = result_name(results, settings)
        written = write_results(run_dir, results, name, pictures, final)
    except KeyboardInterrupt:
        raise EvaluationStopped("SIGINT", 2, results["images"], results["images"]) from None
    log.info("%s", summary_line(results))
    main = run_dir / "eval.json" in written
    log.info(
        "evaluation took %s; wrote %s%s",
        duration(results["seconds"]),
        written[0],
        " and eval.json" if main else "; eval.json keeps a more thorough evaluation",
    )
    return results


def load_for_eval(path: Path, device: torch.device) -> tuple[VAE, VAELoss, DictConfig, dict, Path]:
    """Model (weights loaded), loss, config, checkpoint state and checkpoint path of a run dir
    (its best.pt, else last.pt) or checkpoint file."""
    if path.is_dir():
        candidates = [path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise CheckpointError(
                f"{path} has no checkpoints/best.pt or checkpoints/last.pt; give a run directory "
                "of vae_exp or a checkpoint file"
            )
        path = found[0]
    state = load_checkpoint(path)
    cfg = OmegaConf.create(state["config"])
    loss_fn = instantiate_checked(cfg.loss, "loss")
    model = build_model(cfg, loss_fn)
    model.load_state_dict(state["model"])
    loss_fn.load_state_dict(state.get("loss") or {})
    return model.to(device), loss_fn.to(device), cfg, state, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vae_exp.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("path", type=Path, help="a run directory (best.pt) or a checkpoint")
    parser.add_argument("--k", type=int, help="importance samples per image (run's eval.k)")
    parser.add_argument("--chunk", type=int, help="samples decoded at once per image")
    parser.add_argument("--split", choices=["train", "test"])
    parser.add_argument("--limit", type=int, help="first N images of the split")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--sigma", help="implied | the Gaussian decoder's std")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--data-root", default=None, help="where the data is now, if moved")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    with StopRequest() as stop:  # SIGTERM / SIGINT / SIGUSR2: stop within a chunk
        try:
            results = evaluate_checkpoint(args, stop)
            code = 0 if math.isfinite(results["nll"]) else 1
        except (ConfigError, CheckpointError, ValueError) as e:
            print(f"vae_exp.evaluate: error: {e}", file=sys.stderr)
            return 2
        except EvaluationStopped as e:
            print(
                f"vae_exp.evaluate: {e}. Run the same command again to evaluate.", file=sys.stderr
            )
            code = e.exit_code
        except KeyboardInterrupt:  # a second Ctrl-C while loading
            print(
                "vae_exp.evaluate: stopped by SIGINT before the evaluation began", file=sys.stderr
            )
            code = 128 + signal.SIGINT
    if code > 128:  # stopped: a Ctrl-C from now until the exit changes nothing
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def evaluate_checkpoint(args: argparse.Namespace, stop: StopRequest) -> dict[str, Any]:
    """What main() does with its parsed arguments: load, combine the settings, evaluate."""
    device = resolve_device(args.device)
    model, loss_fn, cfg, state, checkpoint = load_for_eval(args.path, device)
    if args.data_root:
        cfg.data.root = args.data_root
    # The run's own eval settings (older runs: the defaults), then the flags given here.
    values = OmegaConf.to_container(cfg.get("eval") or OmegaConf.create(), resolve=True)
    values.pop("enabled", None)
    if args.sigma is not None:
        args.sigma = args.sigma if args.sigma == "implied" else float(args.sigma)
    flags = ("k", "chunk", "split", "limit", "batch_size", "sigma", "seed")
    values.update({f: getattr(args, f) for f in flags if getattr(args, f) is not None})
    settings = read_eval(OmegaConf.create(values))
    return run_evaluation(
        model,
        loss_fn,
        cfg,
        settings,
        checkpoint.parent.parent,
        state.get("epoch"),
        stop=stop,
        progress=not args.no_progress,
        source=str(checkpoint),
    )


if __name__ == "__main__":
    sys.exit(main())
