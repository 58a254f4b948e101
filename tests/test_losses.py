"""The losses against independent implementations, and the KLD against Monte Carlo."""

import math

import pytest
import torch

from vae_exp.losses import BCEKLD, MSEKLD, gaussian_kld
from vae_exp.models import VAEOutput


def random_output(shape=(16, 1, 8, 8), latent=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    recon = torch.rand(shape, generator=g) * 2 - 1
    mu = torch.randn(shape[0], latent, generator=g)
    log_var = torch.randn(shape[0], latent, generator=g)
    return x, VAEOutput(recon=recon, mu=mu, log_var=log_var, z=mu)


def test_mse_kld_is_the_seed_formula():
    x, out = random_output()
    w = 0.00025
    # written out by hand: mean squared error over every element, and
    # KLD = mean over the batch of 0.5 * sum_j (mu^2 + sigma^2 - log sigma^2 - 1)
    n = x.numel()
    mse = sum((a - b) ** 2 for a, b in zip(out.recon.flatten().tolist(), x.flatten().tolist())) / n
    klds = [
        0.5 * sum(m * m + math.exp(lv) - lv - 1 for m, lv in zip(mus, lvs))
        for mus, lvs in zip(out.mu.tolist(), out.log_var.tolist())
    ]
    kld = sum(klds) / len(klds)
    terms = MSEKLD(w)(out, x)
    assert terms["recon"].item() == pytest.approx(mse, rel=1e-5)
    assert terms["kld"].item() == pytest.approx(kld, rel=1e-5)
    assert terms["weighted_kld"].item() == pytest.approx(w * kld, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(mse + w * kld, rel=1e-5)
    assert terms["kld"].item() > 0


def test_bce_kld_is_a_negative_elbo_in_nats():
    x, out = random_output()
    target = (x + 1) / 2
    p = torch.sigmoid(out.recon)
    log_lik = (target * torch.log(p) + (1 - target) * torch.log(1 - p)).flatten(1).sum(1)
    terms = BCEKLD()(out, target)
    assert terms["recon"].item() == pytest.approx(-log_lik.mean().item(), rel=1e-5)
    kld = gaussian_kld(out.mu, out.log_var).mean()
    assert terms["loss"].item() == pytest.approx(-log_lik.mean().item() + kld.item(), rel=1e-5)


def test_analytic_kld_agrees_with_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=g)
    log_var = torch.randn(4, 3, generator=g) * 0.5
    q = torch.distributions.Normal(mu, torch.exp(0.5 * log_var))
    prior = torch.distributions.Normal(0.0, 1.0)
    torch.manual_seed(1)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - prior.log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(gaussian_kld(mu, log_var), mc, rtol=0.02, atol=0.01)


def test_kld_is_zero_at_the_prior_and_never_negative():
    assert torch.equal(gaussian_kld(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))
    mu, log_var = torch.randn(100, 5), torch.randn(100, 5)
    assert (gaussian_kld(mu, log_var) >= 0).all()


@pytest.mark.parametrize("cls", [MSEKLD, BCEKLD])
def test_negative_weight_is_refused(cls):
    with pytest.raises(ValueError, match="loss.w"):
        cls(w=-1e-3)
