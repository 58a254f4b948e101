"""The losses against independent implementations, and the KLD against Monte Carlo."""

import math

import pytest
import torch

from vae_exp.likelihood import gaussian_kld
from vae_exp.losses import BCEKLD, MSEKLD
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


# --------------------------------------------------------------------------------------------
# KL schedules, free bits, capacity, IWAE

from vae_exp.likelihood import log_normal_diag, log_px_given_z, log_standard_normal  # noqa: E402
from vae_exp.losses import IWAELoss, KLSchedule  # noqa: E402


def test_linear_warmup_schedule():
    s = KLSchedule("linear", warmup_steps=100)
    assert [s(t) for t in (0, 25, 50, 100, 1000)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    s = KLSchedule("linear", warmup_steps=10, start=0.2)
    assert s(0) == pytest.approx(0.2) and s(5) == pytest.approx(0.6) and s(10) == 1.0


def test_cyclical_schedule_is_fu_et_al():
    # cycles of 100 steps; rises linearly over the first half of each, then stays at 1
    s = KLSchedule("cyclical", cycle_steps=100, ramp_fraction=0.5)
    values = [s(t) for t in range(300)]
    assert values[0] == 0.0 and values[25] == pytest.approx(0.5) and values[50] == 1.0
    assert values[99] == 1.0 and values[100] == 0.0 and values[125] == pytest.approx(0.5)
    assert values[:100] == values[100:200] == values[200:]  # periodic
    assert all(0.0 <= v <= 1.0 for v in values)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"kind": "sigmoid"}, "loss.kl_schedule.kind"),
        ({"kind": "linear"}, "loss.kl_schedule.warmup_steps"),
        ({"kind": "cyclical", "cycle_steps": 1}, "loss.kl_schedule.cycle_steps"),
        ({"kind": "cyclical", "cycle_steps": 10, "ramp_fraction": 0}, "ramp_fraction"),
        ({"kind": "constant", "start": 2}, "loss.kl_schedule.start"),
    ],
)
def test_bad_schedule_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        KLSchedule(**kwargs)


def test_scheduled_weight_follows_the_step():
    x, out = random_output()
    loss = MSEKLD(0.01, kl_schedule={"kind": "linear", "warmup_steps": 10})
    for step, factor in ((0, 0.0), (5, 0.5), (10, 1.0)):
        loss.at_step(step)
        terms = loss(out, x)
        assert terms["kl_weight"].item() == pytest.approx(0.01 * factor)
        assert terms["weighted_kld"].item() == pytest.approx(0.01 * factor * terms["kld"].item())
        assert terms["loss"].item() == pytest.approx(
            (terms["recon"] + terms["weighted_kld"]).item()
        )
    # the state a checkpoint keeps brings a fresh loss to the same point
    fresh = MSEKLD(0.01, kl_schedule={"kind": "linear", "warmup_steps": 10})
    loss.at_step(3)
    fresh.load_state_dict(loss.state_dict())
    assert fresh(out, x)["kl_weight"].item() == pytest.approx(0.003)


def test_free_bits_clamp_each_dims_batch_mean():
    x, out = random_output(latent=6)
    lam = 0.8
    terms = MSEKLD(1.0, free_bits=lam)(out, x)
    per_dim = 0.5 * (out.mu**2 + out.log_var.exp() - out.log_var - 1)
    expected = sum(max(lam, v) for v in per_dim.mean(0).tolist())
    assert terms["kld_free_bits"].item() == pytest.approx(expected, rel=1e-6)
    assert terms["weighted_kld"].item() == pytest.approx(expected, rel=1e-6)
    assert terms["kld"].item() == pytest.approx(per_dim.sum(1).mean().item(), rel=1e-6)  # true KL
    # dims under the floor get no KL gradient
    mu = out.mu.clone().requires_grad_()
    from vae_exp.models import VAEOutput

    MSEKLD(1.0, free_bits=lam)(VAEOutput(out.recon, mu, out.log_var, mu), x)["loss"].backward()
    below = per_dim.mean(0) < lam
    assert below.any() and (~below).any()
    assert torch.all(mu.grad[:, below] == 0) and torch.all(mu.grad[:, ~below].abs().sum(0) > 0)


def test_capacity_is_burgess_et_al():
    x, out = random_output()
    target = (x + 1) / 2
    loss = BCEKLD(w=1000.0, capacity={"max": 25.0, "steps": 100})
    for step in (0, 40, 100, 500):
        loss.at_step(step)
        terms = loss(out, target)
        c = 25.0 * min(1.0, step / 100)
        assert terms["capacity"].item() == pytest.approx(c)
        gap = abs(terms["kld"].item() - c)
        assert terms["weighted_kld"].item() == pytest.approx(1000.0 * gap, rel=1e-5)
        assert terms["loss"].item() == pytest.approx(terms["recon"].item() + 1000.0 * gap, rel=1e-5)
    with pytest.raises(ValueError, match=r"loss\.capacity\.steps"):
        BCEKLD(capacity={"max": 25.0, "steps": 0})
    with pytest.raises(ValueError, match=r"loss\.capacity\.speed"):
        BCEKLD(capacity={"max": 25.0, "steps": 10, "speed": 1})


def iwae_output(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, d, shape = 4, 3, (1, 6, 6)
    x = (torch.rand(b, *shape, generator=g) > 0.5).float()
    mu, log_var = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g) * 0.3
    z = mu + torch.randn(k, b, d, generator=g) * (0.5 * log_var).exp()
    recon = torch.randn(k, b, *shape, generator=g)
    from vae_exp.models import VAEOutput

    if k == 1:
        return x, VAEOutput(recon[0], mu, log_var, z[0])
    return x, VAEOutput(recon, mu, log_var, z)


def test_iwae_bound_by_hand():
    for k in (1, 7):
        x, out = iwae_output(k)
        terms = IWAELoss(k=k)(out, x)
        recon = out.recon if k > 1 else out.recon[None]
        z = out.z if k > 1 else out.z[None]
        log_w = torch.zeros(k, len(x))
        for i in range(k):
            for j in range(len(x)):
                p = torch.distributions.Bernoulli(logits=recon[i, j])
                q = torch.distributions.Normal(out.mu[j], (0.5 * out.log_var[j]).exp())
                prior = torch.distributions.Normal(0.0, 1.0)
                log_w[i, j] = (
                    p.log_prob(x[j]).sum()
                    + prior.log_prob(z[i, j]).sum()
                    - q.log_prob(z[i, j]).sum()
                )
        bound = (torch.logsumexp(log_w, 0) - math.log(k)).mean()
        assert terms["loss"].item() == pytest.approx(-bound.item(), rel=1e-5)
        assert terms["kld"].item() == pytest.approx(gaussian_kld(out.mu, out.log_var).mean().item())
    with pytest.raises(ValueError, match="samples=loss.samples"):
        IWAELoss(k=5)(iwae_output(2)[1], iwae_output(2)[0])
    with pytest.raises(ValueError, match=r"loss\.k"):
        IWAELoss(k=0)
    with pytest.raises(ValueError, match=r"loss\.sigma"):
        IWAELoss(likelihood="gaussian")
    assert log_px_given_z and log_normal_diag and log_standard_normal  # the same functions
