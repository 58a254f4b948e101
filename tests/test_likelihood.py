"""Likelihood numerics against closed forms: a linear-Gaussian VAE whose marginal p(x) is known,
torch's own distributions, and direct fp64 computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_exp.likelihood import (
    LIKELIHOODS,
    active_units,
    elbo_parts,
    gaussian_kld,
    implied_gaussian_sigma,
    importance_sampled_log_likelihood,
    kl_per_dim,
    log_importance_weights,
    log_normal_diag,
    log_px_given_z,
    log_standard_normal,
)
from vae_exp.models import ConvVAE
from vae_exp.models.base import VAE, Posterior

SIGMA = 0.5  # the linear model's decoder std
MODEL_SEED = 0  # the linear models' weights; the tolerances below were measured on these


class LinearGaussianVAE(VAE):
    """z ~ N(0, I_D), x | z ~ N(W z + b, SIGMA^2 I_F), so p(x) = N(x; b, W W^T + SIGMA^2 I).

    The encoder returns the exact posterior's mean and the diagonal of its covariance
    Sigma = (I + W^T W / SIGMA^2)^-1: a good q, but not the posterior unless W^T W is diagonal
    (then every importance weight equals p(x)). fp64, so that closed-form comparisons are not
    limited by rounding."""

    decoder_output = "tanh"  # just a label: decode returns the Gaussian mean W z + b, [B, F]

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.latent_dim = weight.shape[1]
        self.weight = nn.Parameter(weight.double())
        self.bias = nn.Parameter(bias.double())

    def posterior_cov(self) -> Tensor:
        eye = torch.eye(self.latent_dim, dtype=torch.float64)
        return torch.linalg.inv(eye + self.weight.T @ self.weight / SIGMA**2)

    def encode(self, x: Tensor, y: Tensor | None = None) -> Posterior:
        cov = self.posterior_cov()
        mu = (x - self.bias) @ self.weight @ cov / SIGMA**2  # cov is symmetric
        log_var = torch.log(torch.diagonal(cov)).expand_as(mu)
        return Posterior(mu=mu, log_var=log_var)

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return z @ self.weight.T + self.bias

    def marginal(self) -> torch.distributions.MultivariateNormal:
        cov = self.weight @ self.weight.T + SIGMA**2 * torch.eye(
            len(self.bias), dtype=torch.float64
        )
        return torch.distributions.MultivariateNormal(self.bias.detach(), cov.detach())


class CountingVAE(LinearGaussianVAE):
    """Records the number of latent rows of every decode call."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__(weight, bias)
        self.decoded_rows: list[int] = []

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        self.decoded_rows.append(z.shape[0])
        return super().decode(z, y)


class ConditionalLinearVAE(LinearGaussianVAE):
    """The linear model with one bias per class: p(x|y) = N(x; b_y, W W^T + SIGMA^2 I)."""

    num_classes = 3

    def __init__(self, weight: Tensor, class_bias: Tensor) -> None:
        super().__init__(weight, class_bias[0])
        self.class_bias = class_bias.double()

    def encode(self, x: Tensor, y: Tensor | None = None) -> Posterior:
        cov = self.posterior_cov()
        mu = (x - self.class_bias[y]) @ self.weight @ cov / SIGMA**2
        return Posterior(mu=mu, log_var=torch.log(torch.diagonal(cov)).expand_as(mu))

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return z @ self.weight.T + self.class_bias[y]


def linear_model(spread: float = 1.0, latent: int = 2, features: int = 5) -> LinearGaussianVAE:
    """W's columns share a random direction; the smaller `spread`, the more correlated the
    posterior (spread 1: correlation -0.57, ELBO gap ~0.3 nats; 0.5: -0.86, gap ~2 nats)."""
    g = torch.Generator().manual_seed(MODEL_SEED)
    shared = torch.randn(features, 1, generator=g, dtype=torch.float64)
    weight = shared + spread * torch.randn(features, latent, generator=g, dtype=torch.float64)
    bias = torch.randn(features, generator=g, dtype=torch.float64)
    return LinearGaussianVAE(weight, bias)


def data_from(model: LinearGaussianVAE, n: int, seed: int = 1) -> Tensor:
    """n draws from the model's marginal p(x): [n, F]."""
    marginal = model.marginal()
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, len(marginal.loc), generator=g, dtype=torch.float64)
    return marginal.loc + eps @ marginal.scale_tril.T


def test_log_densities_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 4, 3, generator=g, dtype=torch.float64)  # [k, B, D]
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    log_var = torch.randn(4, 3, generator=g, dtype=torch.float64)
    normal = torch.distributions.Normal(mu, torch.exp(0.5 * log_var))
    torch.testing.assert_close(log_normal_diag(z, mu, log_var), normal.log_prob(z).sum(-1))
    standard = torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(log_standard_normal(z), standard.log_prob(z).sum(-1))
    assert log_normal_diag(z, mu, log_var).shape == (7, 4)


def test_importance_sampling_converges_to_closed_form_marginal():
    model = linear_model()
    x = data_from(model, 8)
    exact = model.marginal().log_prob(x)
    g = torch.Generator().manual_seed(2)
    estimate = importance_sampled_log_likelihood(model, x, None, 5000, "gaussian", SIGMA, 1000, g)
    # q is close to the posterior (ELBO gap ~0.3 nats), so the k = 5000 estimate's error is
    # small: measured over 10 seeds x 8 examples, its RMS is 0.01 nats and its largest
    # |error| 0.026. 0.05 nats per example is 5 RMS, twice the largest error seen.
    assert estimate.shape == (8,)
    torch.testing.assert_close(estimate, exact, atol=0.05, rtol=0)

    # The ELBO is a lower bound: over 2000 draws of z for each of the 8 x, the mean negative
    # ELBO exceeds the mean -log p(x) by the KL(q || p(z|x)) gap, ~0.3 nats on this model
    # (0.26 to 0.29 per x), about 20 standard errors of that mean; 5 of them leave a margin.
    reps = 2000
    parts = elbo_parts(model, x.repeat(reps, 1), None, "gaussian", SIGMA, g)
    gap = parts["neg_elbo"].mean() + exact.mean()
    stderr = parts["neg_elbo"].view(reps, -1).var(0).mean().sqrt() / math.sqrt(parts["kl"].numel())
    assert gap > 5 * stderr, (gap, stderr)
    torch.testing.assert_close(parts["neg_elbo"], parts["recon_nll"] + parts["kl"])
    posterior = model.encode(x.repeat(reps, 1))
    torch.testing.assert_close(parts["kl"], gaussian_kld(posterior.mu, posterior.log_var))


def test_one_sample_estimate_is_the_elbo_in_expectation():
    model = linear_model(spread=0.5)  # ELBO gap ~2 nats
    n = 20_000
    x = data_from(model, 1).expand(n, -1)  # one x, many independent draws of z
    g = torch.Generator().manual_seed(3)
    one_sample = importance_sampled_log_likelihood(model, x, None, 1, "gaussian", SIGMA, 100, g)
    elbo = -elbo_parts(model, x, None, "gaussian", SIGMA, g)["neg_elbo"]
    # Both are unbiased estimates of the ELBO; their means differ by noise only. 4 standard
    # errors of the difference: a false alarm has probability ~6e-5, while dropping log p(z) or
    # log q(z|x) from the weights shifts the mean by nats.
    stderr = math.sqrt((one_sample.var() + elbo.var()).item() / n)
    assert abs((one_sample.mean() - elbo.mean()).item()) < 4 * stderr
    # and that ELBO is well below log p(x), so this could tell the ELBO from log p(x)
    assert model.marginal().log_prob(x[0]).item() - elbo.mean().item() > 10 * stderr


def test_estimate_grows_with_k():
    model = linear_model(spread=0.5)  # a poor q for k to improve on: ELBO gap ~2 nats
    x = data_from(model, 4).repeat(500, 1)
    exact = model.marginal().log_prob(x).mean().item()
    g = torch.Generator().manual_seed(4)
    means = [
        importance_sampled_log_likelihood(model, x, None, k, "gaussian", SIGMA, 100, g).mean()
        for k in (1, 10, 100)
    ]
    # Expected gaps to log p(x), measured: ~2.1, ~0.08 and ~0.012 nats for k = 1, 10, 100;
    # the batch means' standard errors are ~0.1, ~0.01 and ~0.003 nats, so both steps are
    # 6+ standard errors. All stay below log p(x) + 0.02 (the k = 100 mean's noise, x6).
    assert means[0] < means[1] < means[2] < exact + 0.02, (means, exact)


def test_exactly_k_samples_in_chunks():
    g = torch.Generator().manual_seed(5)
    weight = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=torch.float64))[0] * 1.5
    model = CountingVAE(weight, torch.randn(5, generator=g, dtype=torch.float64))
    x = data_from(model, 3)
    estimate = importance_sampled_log_likelihood(model, x, None, 250, "gaussian", SIGMA, 100, g)
    assert model.decoded_rows == [300, 300, 150]  # chunk * B twice, then (k % chunk) * B
    assert sum(model.decoded_rows) == 250 * len(x)
    # W has orthogonal columns, so the diagonal q is the exact posterior and every weight is
    # p(x): the estimate is exact (to fp64 rounding) only if the sum has k terms divided by k.
    torch.testing.assert_close(estimate, model.marginal().log_prob(x), atol=1e-9, rtol=0)


def test_labels_follow_their_samples():
    g = torch.Generator().manual_seed(6)
    weight = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=torch.float64))[0]
    class_bias = 3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    model = ConditionalLinearVAE(weight, class_bias)
    y = torch.tensor([2, 0, 1, 1])
    x = class_bias[y] + 0.3 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    estimate = importance_sampled_log_likelihood(model, x, y, 30, "gaussian", SIGMA, 7, g)
    cov = weight @ weight.T + SIGMA**2 * torch.eye(5, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(class_bias[y], cov).log_prob(x)
    # exact posterior again (orthonormal W): exact to rounding iff each z is decoded with its y
    torch.testing.assert_close(estimate, exact, atol=1e-9, rtol=0)


class ConfidentlyWrongBernoulli(VAE):
    """Logits of magnitude ~13 with the wrong sign on each of 784 pixels of `target`, plus a
    small term in z: log p(x|z) ~ -1e4 for x = target."""

    decoder_output = "logits"

    def __init__(self, target: Tensor) -> None:
        super().__init__()
        self.latent_dim = 4
        g = torch.Generator().manual_seed(7)
        self.base = nn.Parameter(-13.0 * (2 * target - 1))  # [784]
        self.mix = nn.Parameter(torch.randn(4, 784, generator=g))

    def encode(self, x: Tensor, y: Tensor | None = None) -> Posterior:
        mu = x[:, :4] - 0.5
        return Posterior(mu=mu, log_var=torch.full_like(mu, -1.0))

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.base + z @ self.mix


def test_tiny_weights_stay_finite_and_match_fp64():
    g = torch.Generator().manual_seed(8)
    target = (torch.rand(784, generator=g) < 0.5).float()
    x = torch.stack([target, target, 1 - target])  # last row: confidently right instead
    model = ConfidentlyWrongBernoulli(target)
    k, chunk = 250, 100
    estimate = importance_sampled_log_likelihood(
        model, x, None, k, "bernoulli", None, chunk, g.manual_seed(9)
    )
    # the same draws: reseed, then the chunks of 100, 100, 50 in the order the estimate takes them
    g.manual_seed(9)
    log_w = torch.cat(
        [log_importance_weights(model, x, None, n, "bernoulli", None, g) for n in (100, 100, 50)]
    ).detach()
    assert log_w[:, :2].max() < -5000  # exp() of these underflows even in fp64
    direct = torch.logsumexp(log_w.double(), dim=0) - math.log(k)
    assert torch.isfinite(estimate).all()
    # fp32 numbers near -1e4 are spaced ~1e-3 apart, so the fp32 result can be off by about
    # one spacing from the fp64 one; measured 4e-5. 1e-2 still catches any lost sample or
    # log-k slip (>= 4e-3 nats at k = 250) and any overflow or underflow.
    torch.testing.assert_close(estimate.double(), direct, atol=1e-2, rtol=0)


def test_log_px_given_z_matches_torch():
    g = torch.Generator().manual_seed(10)
    logits = 3 * torch.randn(6, 4, 1, 8, 8, generator=g)  # [k, B, C, H, W]
    x01 = torch.rand(4, 1, 8, 8, generator=g)
    bce = F.binary_cross_entropy_with_logits(logits, x01.expand_as(logits), reduction="none")
    got = log_px_given_z(logits, x01, "bernoulli")
    assert got.shape == (6, 4)
    torch.testing.assert_close(got, -bce.sum(dim=(-3, -2, -1)))

    mean = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    x = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    normal = torch.distributions.Normal(mean, 0.3)
    torch.testing.assert_close(
        log_px_given_z(mean, x, "gaussian", sigma=0.3), normal.log_prob(x).sum(dim=(1, 2, 3))
    )
    # flat data [B, F]
    torch.testing.assert_close(
        log_px_given_z(mean.flatten(1), x.flatten(1), "gaussian", 0.3),
        normal.log_prob(x).flatten(1).sum(1),
    )

    with pytest.raises(ValueError, match="sigma"):
        log_px_given_z(mean, x, "gaussian")
    with pytest.raises(ValueError, match="sigma"):
        log_px_given_z(mean, x, "gaussian", sigma=0.0)
    with pytest.raises(ValueError, match=" \\| ".join(LIKELIHOODS)):
        log_px_given_z(mean, x, "laplace")


def test_implied_gaussian_sigma_makes_mse_a_scaled_negative_log_likelihood():
    w, pixels = 0.00025, 1024
    sigma = implied_gaussian_sigma(w, pixels)
    assert sigma**2 == pytest.approx(0.128, rel=1e-12)
    g = torch.Generator().manual_seed(11)
    x = (torch.rand(1, 1, 32, 32, generator=g) * 2 - 1).double()
    offsets = []
    for _ in range(5):
        x_hat = (torch.rand(1, 1, 32, 32, generator=g) * 2 - 1).double()
        nll = -log_px_given_z(x_hat, x, "gaussian", sigma).item()
        offsets.append(nll - F.mse_loss(x_hat, x).item() / w)
    # the difference is the normaliser D/2 log(2 pi sigma^2), whatever x_hat is (fp64: 1e-9)
    normaliser = pixels / 2 * math.log(2 * math.pi * sigma**2)
    assert offsets == pytest.approx([normaliser] * 5, abs=1e-9)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="w="):
            implied_gaussian_sigma(bad, pixels)


def test_active_units_counts_varying_dims():
    g = torch.Generator().manual_seed(12)
    means = torch.cat(
        [
            torch.randn(1000, 3, generator=g),  # std 1: variance ~1 >> 0.01
            0.7 + 1e-3 * torch.randn(1000, 2, generator=g),  # variance ~1e-6 << 0.01
        ],
        dim=1,
    )
    count, variances = active_units(means)
    assert count == 3
    assert variances.shape == (5,)
    torch.testing.assert_close(variances, means.double().var(dim=0, correction=0))
    assert active_units(means, threshold=2.0)[0] == 0


def test_kl_per_dim_sums_to_gaussian_kld():
    g = torch.Generator().manual_seed(13)
    mu = torch.randn(16, 6, generator=g)
    log_var = torch.randn(16, 6, generator=g)
    per_dim = kl_per_dim(mu, log_var)
    assert per_dim.shape == (16, 6)
    assert (per_dim >= 0).all()
    torch.testing.assert_close(per_dim.sum(1), gaussian_kld(mu, log_var))


def test_log_weights_are_differentiable_for_an_iwae_loss():
    model = ConvVAE(1, 8, latent_dim=3, hidden_dims=(4,), decoder_output="logits").eval()
    g = torch.Generator().manual_seed(14)
    x = torch.rand(2, 1, 8, 8, generator=g)
    log_w = log_importance_weights(model, x, None, 5, "bernoulli", generator=g)
    assert log_w.shape == (5, 2)
    iwae = -(torch.logsumexp(log_w, dim=0) - math.log(5)).mean()
    iwae.backward()
    for module in (model.fc_mu, model.fc_var, model.decoder_input):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    estimate = importance_sampled_log_likelihood(model, x, None, 5, "bernoulli", generator=g)
    assert not estimate.requires_grad
