"""Numbers a paper can quote, for a trained model on the test split:

    python -m vae_exp.evaluate <run dir or checkpoint> [--k 1000] [--limit N] [--device cuda]

- the negative ELBO per image in nats, with its reconstruction and KL parts, for the loss's
  likelihood: Bernoulli (`bce_kld`), or for `mse_kld` a Gaussian decoder with the fixed std
  implied by the loss weight (sigma^2 = w * pixels / 2; stated in the output);
- the importance-sampled estimate of log p(x) (Burda et al. 2015) with exactly k samples;
- reconstruction MSE in pixel space ([0, 1] pixel values, from the posterior mean);
- active units (latent dims whose Cov_x(E_q[z|x]) > 0.01) and the KL of each latent dim;
- pictures: samples, reconstructions, latent interpolations, and for a 2-D latent the decoded
  manifold.

Results go to <run dir>/eval.json, a line of metrics.jsonl and eval/*.png. Training runs the
same evaluation at its end (`eval` in the config) and also puts the numbers in the W&B summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from vae_exp.checkpoint import CheckpointError, load_checkpoint
from vae_exp.config import ConfigError, EvalConfig, instantiate_checked, read_data, read_eval
from vae_exp.data import Batches, split_batches
from vae_exp.likelihood import (
    active_units,
    elbo_parts,
    implied_gaussian_sigma,
    importance_sampled_log_likelihood,
    kl_per_dim,
)
from vae_exp.losses import VAELoss
from vae_exp.models import VAE
from vae_exp.tracking import image_grid

log = logging.getLogger(__name__)


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
) -> dict[str, Any]:
    """The evaluation numbers (means per image over `batches`; see the module docstring)."""
    model.eval()
    device = next(model.parameters()).device
    generator = generator or torch.Generator(device).manual_seed(settings.seed)
    x0, _ = next(iter(batches))
    pixels = x0[0].numel()
    sigma, decoder = decoder_sigma(loss_fn, settings.sigma, pixels)
    lo, hi = loss_fn.pixel_range
    sums = {"neg_elbo": 0.0, "recon_nll": 0.0, "kl": 0.0, "log_likelihood": 0.0, "mse": 0.0}
    means, kls = [], []
    n = 0
    for x, y in batches:
        y = y if model.num_classes else None
        parts = elbo_parts(model, x, y, loss_fn.likelihood, sigma, generator)
        log_px = importance_sampled_log_likelihood(
            model, x, y, settings.k, loss_fn.likelihood, sigma, settings.chunk, generator
        )
        posterior = model.encode(x, y)
        recon = model.to_image(model.decode(posterior.mu, y))
        mse = (((recon - x) / (hi - lo)) ** 2).flatten(1).mean(1)  # [0, 1] pixel units
        for key, value in (*parts.items(), ("log_likelihood", log_px), ("mse", mse)):
            sums[key] += value.double().sum().item()
        means.append(posterior.mu.double().cpu())
        kls.append(kl_per_dim(posterior.mu, posterior.log_var).double().sum(0).cpu())
        n += len(x)
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
def eval_pictures(
    model: VAE, batches: Batches, value_range: tuple[float, float], n: int = 8, steps: int = 10
) -> dict[str, Any]:
    """Grids (uint8 arrays): prior samples (one row per class for a conditional model),
    test images over their reconstructions, interpolations between the posterior means of
    pairs of test images (a row per pair, end images at both sides), and for a 2-D latent the
    decoded manifold over the prior's quantiles (Kingma & Welling 2013, figure 4)."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    x, y = next(iter(batches))
    x, y = x[: 2 * n], y[: 2 * n]
    y_or_none = y if model.num_classes else None
    grids: dict[str, Any] = {}
    if model.num_classes:
        z = torch.randn(n, model.latent_dim, generator=gen).to(device).repeat(model.num_classes, 1)
        labels = torch.arange(model.num_classes, device=device).repeat_interleave(n)
        grids["samples"] = image_grid(model.to_image(model.decode(z, labels)), n, value_range)
    else:
        z = torch.randn(n * n, model.latent_dim, generator=gen).to(device)
        grids["samples"] = image_grid(model.to_image(model.decode(z)), n, value_range)
    mu = model.encode(x, y_or_none).mu
    recon = model.to_image(model.decode(mu, y_or_none))
    grids["reconstructions"] = image_grid(torch.cat([x[:n], recon[:n]]), n, value_range)
    pairs = min(n, len(x) // 2)
    if pairs:
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


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    """eval.json (replaced atomically) and one line of metrics.jsonl with the eval/* numbers."""
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(run_dir / "eval.json")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(flat_metrics(results)) + "\n")


def flat_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The scalar results as eval/<name> (what metrics.jsonl and the W&B summary get)."""
    keys = ("neg_elbo", "recon_nll", "kl", "log_likelihood", "nll", "mse", "active_units", "k")
    out = {f"eval/{k}": results[k] for k in keys}
    out.update({"eval/epoch": results.get("epoch"), "eval/images": results["images"]})
    return out


def summary_line(r: dict[str, Any]) -> str:
    return (
        f"test ({r['images']} images, {r['likelihood']}): -ELBO {r['neg_elbo']:.3f} nats "
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
) -> dict[str, Any]:
    """Evaluate, write eval.json / metrics.jsonl / eval/*.png into run_dir; returns the results."""
    device = next(model.parameters()).device
    batches = eval_batches(cfg, settings, loss_fn.pixel_range, device)
    start = time.perf_counter()
    results = evaluate(model, loss_fn, batches, settings)
    results.update(
        {
            "epoch": epoch,
            "split": settings.split,
            "seconds": time.perf_counter() - start,
            "device": str(device),
        }
    )
    pictures = eval_pictures(model, batches, loss_fn.pixel_range)
    results["pictures"] = [str(p) for p in save_pictures(pictures, run_dir / "eval")]
    write_results(run_dir, results)
    log.info("%s", summary_line(results))
    return results


def load_for_eval(path: Path, device: torch.device) -> tuple[VAE, VAELoss, DictConfig, dict, Path]:
    """Model (weights loaded), loss, config and checkpoint of a run dir or checkpoint file."""
    from vae_exp.train import build_model

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
    return model.to(device), loss_fn.to(device), cfg, state, path.parent.parent


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from vae_exp.train import resolve_device

    try:
        device = resolve_device(args.device)
        model, loss_fn, cfg, state, run_dir = load_for_eval(args.path, device)
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
        results = run_evaluation(model, loss_fn, cfg, settings, run_dir, state.get("epoch"))
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"vae_exp.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(summary_line(results))
    print(f"wrote {run_dir / 'eval.json'}")
    return 0 if math.isfinite(results["nll"]) else 1


if __name__ == "__main__":
    sys.exit(main())
