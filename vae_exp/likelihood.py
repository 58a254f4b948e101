"""Likelihood evaluation: importance-sampled log p(x) (Burda et al. 2015), ELBO terms, active units.

Conventions: B examples, D latent dims, k importance samples. Every log-density is in nats and
summed over its event dims (latent dims for z, channels and pixels for x), one value per example.
Computations run in at least fp32 (bf16 inputs are promoted; fp64 stays fp64).

The model must be in the state it is evaluated in (`model.eval()` for BatchNorm): these functions
never change it, and they decode k * B (or chunk * B) latents in one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vae_exp.config import check, is_count, is_number
from vae_exp.models.base import VAE

LIKELIHOODS = ("bernoulli", "gaussian")

_LOG_2PI = math.log(2 * math.pi)


def _at_least_fp32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I): z [..., D] -> [...], summed over the last dim."""
    return -0.5 * (z.pow(2) + _LOG_2PI).sum(dim=-1)


def log_normal_diag(z: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(log_var))) summed over the last dim: z [..., B, D] with mu, log_var
    [B, D] (a leading sample axis of z broadcasts) -> [..., B]."""
    return -0.5 * (_LOG_2PI + log_var + (z - mu).pow(2) * torch.exp(-log_var)).sum(dim=-1)


def kl_per_dim(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu_j, sigma_j^2) || N(0, 1)) of each latent dim j, per example: [B, D] -> [B, D].
    0.5 * (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1): the one place this formula is written."""
    return 0.5 * (mu.pow(2) + torch.exp(log_var) - log_var - 1)


def gaussian_kld(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)), summed over latent dims, one value per example ([B])."""
    return kl_per_dim(mu, log_var).sum(dim=1)


def _check_likelihood(likelihood: str, sigma: float | None) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood={likelihood!r}; allowed: {' | '.join(LIKELIHOODS)}")
    if likelihood == "gaussian":
        if sigma is None:
            raise ValueError("likelihood='gaussian' needs sigma (the decoder's fixed std)")
        check(is_number(sigma) and sigma > 0, "sigma", sigma, "a number > 0 (the decoder's std)")


def log_px_given_z(
    decoded: Tensor, x: Tensor, likelihood: str, sigma: float | None = None
) -> Tensor:
    """log p(x|z) per example, summed over channels and pixels (every dim of x but the first).

    decoded: [..., C, H, W] or [..., F], its leading dims broadcasting against x [B, ...];
    e.g. decoded [k, B, C, H, W] with x [B, C, H, W] gives [k, B].
    - "bernoulli": decoded are logits, x in [0, 1]; equals -BCE-with-logits summed.
    - "gaussian": decoded is the mean, `sigma` (required, > 0) the fixed std in the data's
      units; the sum of log N(x; decoded, sigma^2) over channels and pixels.
    """
    _check_likelihood(likelihood, sigma)
    decoded, x = _at_least_fp32(decoded), _at_least_fp32(x)
    if likelihood == "bernoulli":
        # -BCE(l, x) = x * l - log(1 + e^l): softplus is stable for |l| large
        per_element = x * decoded - F.softplus(decoded)
    else:
        per_element = -0.5 * ((x - decoded) / sigma).pow(2) - math.log(sigma) - 0.5 * _LOG_2PI
    event_dims = tuple(range(-(x.dim() - 1), 0))
    return per_element.sum(dim=event_dims) if event_dims else per_element


def implied_gaussian_sigma(w: float, num_pixels: int) -> float:
    """The std of the Gaussian decoder under which the MSE loss is a scaled negative ELBO.

    `F.mse_loss` averages over num_pixels = C * H * W values per image, so
    mean((x - x_hat)^2) + w * KLD = w * (sum (x - x_hat)^2 / (w * num_pixels) + KLD), which is
    w times the negative ELBO sum (x - x_hat)^2 / (2 sigma^2) + KLD (up to a constant) when
    sigma^2 = w * num_pixels / 2. Raises ValueError for w <= 0 or num_pixels < 1."""
    if isinstance(w, bool) or not isinstance(w, int | float) or not w > 0:  # NaN too
        raise ValueError(f"w={w!r}; allowed: a number > 0 (the KL weight of the MSE loss)")
    if isinstance(num_pixels, bool) or not isinstance(num_pixels, int) or num_pixels < 1:
        raise ValueError(f"num_pixels={num_pixels!r}; allowed: an integer >= 1 (C * H * W)")
    return math.sqrt(w * num_pixels / 2)


def log_importance_weights(
    model: VAE,
    x: Tensor,
    y: Tensor | None,
    k: int,
    likelihood: str,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x) for z_i ~ q(z|x): [k, B].

    One encode; the k * B reparameterised samples are decoded in one batch (z flattened
    sample-major, labels `y.repeat(k)` to match, as in `VAE.forward`). Differentiable with
    respect to the model's parameters (for an IWAE loss); wrap in no_grad to evaluate."""
    _check_likelihood(likelihood, sigma)
    check(is_count(k), "k", k, "an integer >= 1 (the number of samples)")
    posterior = model.encode(x, y)
    mu, log_var = _at_least_fp32(posterior.mu), _at_least_fp32(posterior.log_var)
    batch = mu.shape[0]
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + eps * torch.exp(0.5 * log_var)  # [k, B, D]
    ys = None if y is None else y.repeat(k)
    decoded = model.decode(z.flatten(0, 1), ys).unflatten(0, (k, batch))
    log_px = log_px_given_z(decoded, x, likelihood, sigma)
    return log_px + log_standard_normal(z) - log_normal_diag(z, mu, log_var)


@torch.no_grad()
def importance_sampled_log_likelihood(
    model: VAE,
    x: Tensor,
    y: Tensor | None,
    k: int,
    likelihood: str,
    sigma: float | None = None,
    chunk: int = 100,
    generator: torch.Generator | None = None,
    before_chunk: Callable[[], None] | None = None,
) -> Tensor:
    """The k-sample importance-sampled estimate of log p(x), per example: [B].

    log p(x) ~= logsumexp_i(log w_i) - log k over exactly k samples, drawn `chunk` at a time
    (the last chunk holds k % chunk when that is not 0), so at most chunk * B latents are
    decoded at once. Each chunk is reduced to its logsumexp and those are combined by a
    logsumexp, so log weights of any magnitude (e.g. -1e4) stay finite. Its expectation is a
    lower bound on log p(x) that rises with k (k = 1: the ELBO). Same dtype as the log weights.
    `before_chunk()` is called before each chunk (the evaluation checks for a signal there)."""
    check(is_count(chunk), "chunk", chunk, "an integer >= 1 (samples per decode)")
    check(is_count(k), "k", k, "an integer >= 1 (the number of samples)")
    sizes = [chunk] * (k // chunk) + ([k % chunk] if k % chunk else [])
    chunk_lse = []
    for n in sizes:
        if before_chunk is not None:
            before_chunk()
        log_w = log_importance_weights(model, x, y, n, likelihood, sigma, generator)
        chunk_lse.append(torch.logsumexp(log_w, 0))
    return torch.logsumexp(torch.stack(chunk_lse), dim=0) - math.log(k)


@torch.no_grad()
def elbo_parts(
    model: VAE,
    x: Tensor,
    y: Tensor | None,
    likelihood: str,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Single-sample ELBO terms per example, each [B]: "recon_nll" = -log p(x|z) for one
    z ~ q(z|x), "kl" = analytic KL(q(z|x) || N(0, I)), "neg_elbo" = recon_nll + kl."""
    _check_likelihood(likelihood, sigma)
    posterior = model.encode(x, y)
    z = posterior.rsample(generator)
    recon_nll = -log_px_given_z(model.decode(z, y), x, likelihood, sigma)
    kl = gaussian_kld(_at_least_fp32(posterior.mu), _at_least_fp32(posterior.log_var))
    return {"recon_nll": recon_nll, "kl": kl, "neg_elbo": recon_nll + kl}


def active_units(posterior_means: Tensor, threshold: float = 0.01) -> tuple[int, Tensor]:
    """Active latent units (Burda et al. 2015): dim u is active if Cov_x(E_q[z_u|x]) > threshold.

    posterior_means: [N, D], the posterior mean mu of each of N examples. The variance over the
    examples is the biased (population) one, dividing by N, computed in fp64. Returns
    (number of active dims, per-dim variances [D] in fp64)."""
    if posterior_means.dim() != 2 or posterior_means.shape[0] < 1:
        raise ValueError(f"posterior_means has shape {tuple(posterior_means.shape)}; need [N, D]")
    variances = posterior_means.double().var(dim=0, correction=0)
    return int((variances > threshold).sum().item()), variances
