"""VAE losses. Each returns named terms: `loss` (what is minimised), `recon`, `kld` (unweighted,
always >= 0) and `weighted_kld` (w * kld), so logs show every term with and without its weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vae_exp.models.base import VAEOutput

LossTerms = dict[str, Tensor]


def gaussian_kld(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) = 0.5 * sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1),
    summed over latent dims, one value per example (shape [batch])."""
    return 0.5 * torch.sum(mu**2 + torch.exp(log_var) - log_var - 1, dim=1)


class VAELoss:
    """Reconstruction term + w * KLD. Subclasses set the likelihood and what the data looks like:

    - `decoder_output`: what the decoder must return ("tanh" image or Bernoulli "logits");
    - `pixel_range`: the range the data is normalised to, (-1, 1) or (0, 1).
    """

    decoder_output: str
    pixel_range: tuple[float, float]

    def __init__(self, w: float) -> None:
        if isinstance(w, bool) or not isinstance(w, int | float) or not w >= 0:  # NaN too
            raise ValueError(f"loss.w={w!r}; allowed: a number >= 0 (the KL weight)")
        self.w = float(w)

    def reconstruction(self, recon: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, out: VAEOutput, x: Tensor) -> LossTerms:
        recon = self.reconstruction(out.recon, x)
        kld = gaussian_kld(out.mu, out.log_var).mean()
        weighted_kld = self.w * kld
        return {
            "loss": recon + weighted_kld,
            "recon": recon,
            "kld": kld,
            "weighted_kld": weighted_kld,
        }


class MSEKLD(VAELoss):
    """The seed's loss: `F.mse_loss(recon, x)` (mean over batch, channels and pixels) plus
    w * KLD (sum over latent dims, mean over batch). Data in [-1, 1], decoder ends in Tanh."""

    decoder_output = "tanh"
    pixel_range = (-1.0, 1.0)

    def __init__(self, w: float = 0.00025) -> None:
        super().__init__(w)

    def reconstruction(self, recon: Tensor, x: Tensor) -> Tensor:
        return F.mse_loss(recon, x)


class BCEKLD(VAELoss):
    """Bernoulli decoder: binary cross-entropy of the logits against targets in [0, 1], summed
    over channels and pixels, plus w * KLD (sum over latent dims); both averaged over the batch.
    With w = 1 the loss is the negative ELBO in nats per image."""

    decoder_output = "logits"
    pixel_range = (0.0, 1.0)

    def __init__(self, w: float = 1.0) -> None:
        super().__init__(w)

    def reconstruction(self, recon: Tensor, x: Tensor) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(recon, x, reduction="none")
        return bce.flatten(1).sum(dim=1).mean()
