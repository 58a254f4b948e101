"""VAE losses. Each returns named terms: `loss` (what is minimised), `recon`, `kld` (the true
KL(q(z|x) || N(0, I)), unweighted, always >= 0), `weighted_kld` (the KL part of `loss`) and
`kl_weight` (the weight it had), so logs show every term with and without its weight.

The KL part can follow a schedule of the optimizer step (constant, linear warm-up, cyclical),
use free bits, or Burgess et al.'s capacity; the training loop calls `at_step(step)` before
every step, and `state_dict()` goes into checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from vae_exp.config import invalid, is_count, is_number
from vae_exp.likelihood import (
    gaussian_kld,
    kl_per_dim,
    log_normal_diag,
    log_px_given_z,
    log_standard_normal,
)
from vae_exp.models.base import VAEOutput

LossTerms = dict[str, Tensor]
SCHEDULES = ("constant", "linear", "cyclical")


class KLSchedule:
    """A factor in [0, 1] on the KL weight as a function of the optimizer step:

    - constant: 1;
    - linear: warm-up from `start` to 1 over `warmup_steps` steps, then 1 (Bowman et al. 2016);
    - cyclical: Fu et al. 2019: repeating cycles of `cycle_steps` steps; in each, a linear rise
      from `start` to 1 over the first `ramp_fraction` of the cycle, then 1 for the rest.
    """

    def __init__(
        self,
        kind: str = "constant",
        warmup_steps: int = 0,
        cycle_steps: int = 0,
        ramp_fraction: float = 0.5,
        start: float = 0.0,
    ) -> None:
        key = "loss.kl_schedule"
        if kind not in SCHEDULES:
            raise invalid(f"{key}.kind", kind, " | ".join(SCHEDULES))
        if kind == "linear" and not is_count(warmup_steps):
            raise invalid(f"{key}.warmup_steps", warmup_steps, "an integer >= 1 for kind=linear")
        if kind == "cyclical":
            if not (is_count(cycle_steps) and cycle_steps >= 2):
                raise invalid(f"{key}.cycle_steps", cycle_steps, "an integer >= 2 for cyclical")
            if not (is_number(ramp_fraction) and 0 < ramp_fraction <= 1):
                raise invalid(f"{key}.ramp_fraction", ramp_fraction, "a number in (0, 1]")
        if not (is_number(start) and 0 <= start <= 1):
            raise invalid(f"{key}.start", start, "a number in [0, 1]")
        self.kind, self.warmup_steps, self.cycle_steps = kind, warmup_steps, cycle_steps
        self.ramp_fraction, self.start = float(ramp_fraction), float(start)

    def __call__(self, step: int) -> float:
        """The factor for the step after `step` steps have been taken."""
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":
            progress = min(1.0, step / self.warmup_steps)
        else:
            progress = min(1.0, (step % self.cycle_steps) / (self.ramp_fraction * self.cycle_steps))
        return self.start + (1.0 - self.start) * progress


class VAELoss:
    """Reconstruction term + the KL part. Subclasses set the likelihood and what the data
    looks like:

    - `decoder_output`: what the decoder must return ("tanh" image or Bernoulli "logits");
    - `pixel_range`: the range the data is normalised to, (-1, 1) or (0, 1);
    - `likelihood`: "gaussian" or "bernoulli", for the likelihood evaluation;
    - `samples`: posterior samples per image the loss needs (IWAE: k).

    The KL part is `w * schedule(step) * KL`, where KL is the batch mean of the summed KL, or
    with `free_bits` = lambda > 0 the sum over latent dims of max(lambda, batch mean of that
    dim's KL) (Kingma et al. 2016). With `capacity` = {max: C_max nats, steps: N} it is
    Burgess et al. 2018's `w * |KL - C|` (w is their gamma), C rising linearly from 0 to C_max
    over N steps. `kld` is always the true KL.
    """

    decoder_output: str
    pixel_range: tuple[float, float]
    likelihood: str
    samples: int = 1

    def __init__(
        self,
        w: float,
        kl_schedule: Mapping | None = None,
        free_bits: float = 0.0,
        capacity: Mapping | None = None,
    ) -> None:
        if not (is_number(w) and w >= 0):
            raise invalid("loss.w", w, "a number >= 0 (the KL weight)")
        if not (is_number(free_bits) and free_bits >= 0):
            raise invalid("loss.free_bits", free_bits, "a number >= 0 (nats per latent dim)")
        self.w = float(w)
        self.free_bits = float(free_bits)
        self.schedule = KLSchedule(**dict(kl_schedule or {}))
        self.capacity_max = self.capacity_steps = None
        if capacity is not None:
            capacity = dict(capacity)
            unknown = sorted(set(capacity) - {"max", "steps"})
            if unknown:
                raise invalid(
                    f"loss.capacity.{unknown[0]}", capacity[unknown[0]], "keys max, steps"
                )
            c_max, steps = capacity.get("max"), capacity.get("steps")
            if not (is_number(c_max) and c_max >= 0):
                raise invalid("loss.capacity.max", c_max, "a number of nats >= 0")
            if not is_count(steps):
                raise invalid("loss.capacity.steps", steps, "an integer >= 1")
            if self.schedule.kind != "constant":
                raise ValueError(
                    "loss.capacity and loss.kl_schedule are two ways to anneal the KL; allowed: "
                    "one of them (kl_schedule.kind=constant with a capacity)."
                )
            self.capacity_max, self.capacity_steps = float(c_max), steps
        self.step = 0
        self.kl_scale = torch.ones(())  # schedule(step): a tensor, so a CUDA graph sees updates
        self.capacity_now = torch.zeros(())

    # The state a checkpoint keeps, and where the schedule is.
    def to(self, device: torch.device) -> VAELoss:
        self.kl_scale = self.kl_scale.to(device)
        self.capacity_now = self.capacity_now.to(device)
        return self

    def at_step(self, step: int) -> None:
        """Set the schedule's values for the step after `step` optimizer steps (in place)."""
        if step == self.step and step:
            return
        self.step = step
        if self.schedule.kind != "constant":
            self.kl_scale.fill_(self.schedule(step))
        if self.capacity_max is not None:
            self.capacity_now.fill_(self.capacity_max * min(1.0, step / self.capacity_steps))

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "kl_scale": float(self.kl_scale),
            "capacity": float(self.capacity_now),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.step = -1
        self.at_step(int(state.get("step", 0)))

    # The loss itself.
    def reconstruction(self, recon: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def kl_terms(self, mu: Tensor, log_var: Tensor) -> LossTerms:
        """kld (true KL), weighted_kld (the KL part of the loss) and the weight used."""
        per_dim = kl_per_dim(mu, log_var)
        kld = per_dim.sum(dim=1).mean()
        terms = {"kld": kld}
        regularised = kld
        if self.free_bits > 0:
            regularised = per_dim.mean(dim=0).clamp(min=self.free_bits).sum()
            terms["kld_free_bits"] = regularised
        if self.capacity_max is not None:
            terms["capacity"] = self.capacity_now
            terms["weighted_kld"] = self.w * (regularised - self.capacity_now).abs()
            terms["kl_weight"] = torch.full_like(kld, self.w)  # a kernel, not a host copy
            return terms
        if self.schedule.kind == "constant":  # a plain float: the original script's arithmetic
            terms["weighted_kld"] = self.w * regularised
            terms["kl_weight"] = torch.full_like(kld, self.w)
        else:
            weight = self.w * self.kl_scale
            terms["weighted_kld"] = weight * regularised
            terms["kl_weight"] = weight
        return terms

    def __call__(self, out: VAEOutput, x: Tensor) -> LossTerms:
        recon = self.reconstruction(out.recon, x)
        kl = self.kl_terms(out.mu, out.log_var)
        return {"loss": recon + kl["weighted_kld"], "recon": recon, **kl}


class MSEKLD(VAELoss):
    """The original script's loss: `F.mse_loss(recon, x)` (mean over batch, channels and
    pixels) plus w * KLD (sum over latent dims, mean over batch). Data in [-1, 1], decoder ends
    in Tanh. As a likelihood it is a Gaussian decoder with a fixed variance (vae_exp.likelihood).
    """

    decoder_output = "tanh"
    pixel_range = (-1.0, 1.0)
    likelihood = "gaussian"

    def __init__(
        self,
        w: float = 0.00025,
        kl_schedule: Mapping | None = None,
        free_bits: float = 0.0,
        capacity: Mapping | None = None,
    ) -> None:
        super().__init__(w, kl_schedule, free_bits, capacity)

    def reconstruction(self, recon: Tensor, x: Tensor) -> Tensor:
        return F.mse_loss(recon, x)


class BCEKLD(VAELoss):
    """Bernoulli decoder: binary cross-entropy of the logits against targets in [0, 1], summed
    over channels and pixels, plus w * KLD (sum over latent dims); both averaged over the batch.
    With w = 1 the loss is the negative ELBO in nats per image; w = beta > 1 is Higgins et
    al.'s beta-VAE."""

    decoder_output = "logits"
    pixel_range = (0.0, 1.0)
    likelihood = "bernoulli"

    def __init__(
        self,
        w: float = 1.0,
        kl_schedule: Mapping | None = None,
        free_bits: float = 0.0,
        capacity: Mapping | None = None,
    ) -> None:
        super().__init__(w, kl_schedule, free_bits, capacity)

    def reconstruction(self, recon: Tensor, x: Tensor) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(recon, x, reduction="none")
        return bce.flatten(1).sum(dim=1).mean()


BOUNDS = ("iwae", "elbo")


class IWAELoss(VAELoss):
    """Burda et al. 2015's bounds on log p(x) from `k` posterior samples per image, with
    log-weights log w_i = log p(x, z_i) - log q(z_i | x), in nats per image:

    - bound="iwae": loss = -mean over the batch of log (1/k sum_i w_i), the importance-weighted
      bound (their IWAE rows);
    - bound="elbo": loss = -mean over the batch of (1/k) sum_i log w_i, the ELBO estimated with
      k samples (their "VAE (k)" rows: the same cost per step, a looser bound).

    With k = 1 both are the negative ELBO (with a sampled KL term). Bernoulli decoder (data in
    [0, 1]) or a Gaussian one with a fixed std `sigma` (data in [-1, 1]). Also reported, not
    optimised: `recon` (the mean over the k samples of -log p(x|z)), `kld` (analytic, mean over
    the batch) and `weighted_kld` (= kld, weight 1), whose sum is the negative ELBO.
    """

    def __init__(
        self,
        k: int = 5,
        likelihood: str = "bernoulli",
        sigma: float | None = None,
        bound: str = "iwae",
    ) -> None:
        super().__init__(1.0)
        if not is_count(k):
            raise invalid("loss.k", k, "an integer >= 1 (importance samples per image)")
        if bound not in BOUNDS:
            raise invalid("loss.bound", bound, " | ".join(BOUNDS))
        if likelihood not in ("bernoulli", "gaussian"):
            raise invalid("loss.likelihood", likelihood, "bernoulli | gaussian")
        if likelihood == "gaussian" and not (is_number(sigma) and sigma > 0):
            raise invalid("loss.sigma", sigma, "a number > 0 (the decoder's std) for gaussian")
        if likelihood == "bernoulli" and sigma is not None:
            raise invalid("loss.sigma", sigma, "null for likelihood=bernoulli")
        self.samples, self.likelihood, self.sigma, self.bound = k, likelihood, sigma, bound
        self.decoder_output = "logits" if likelihood == "bernoulli" else "tanh"
        self.pixel_range = (0.0, 1.0) if likelihood == "bernoulli" else (-1.0, 1.0)

    def __call__(self, out: VAEOutput, x: Tensor) -> LossTerms:
        recon, z = (out.recon, out.z) if out.z.dim() == 3 else (out.recon[None], out.z[None])
        k = len(z)
        if k != self.samples:
            raise ValueError(
                f"IWAELoss(k={self.samples}) got {k} posterior sample(s) per image; call the "
                f"model with samples=loss.samples"
            )
        log_px = log_px_given_z(recon, x, self.likelihood, self.sigma)  # [k, B]
        log_w = log_px + log_standard_normal(z) - log_normal_diag(z, out.mu, out.log_var)
        if self.bound == "iwae":
            bound = torch.logsumexp(log_w, dim=0) - math.log(k)
        else:
            bound = log_w.mean(dim=0)
        kld = gaussian_kld(out.mu, out.log_var).mean()
        return {
            "loss": -bound.mean(),
            "recon": -log_px.mean(),
            "kld": kld,
            "weighted_kld": kld,
            "kl_weight": torch.ones_like(kld),
        }
