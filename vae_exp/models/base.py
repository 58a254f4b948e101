"""The interface every model implements, so every model plugs into the same loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

DECODER_OUTPUTS = ("tanh", "logits")


@dataclass
class Posterior:
    """A diagonal Gaussian q(z|x) given by its mean and log-variance."""

    mu: Tensor
    log_var: Tensor

    def rsample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw z = mu + eps * sigma with eps ~ N(0, I)."""
        std = torch.exp(0.5 * self.log_var)
        if generator is None:
            eps = torch.randn_like(std)
        else:
            eps = torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)
        return self.mu + eps * std


@dataclass
class VAEOutput:
    """What `VAE.forward` returns: the decoder output for a posterior sample, and that sample."""

    recon: Tensor  # decoder output: an image in the data's range (tanh) or Bernoulli logits
    mu: Tensor
    log_var: Tensor
    z: Tensor

    def float(self) -> VAEOutput:
        """The same output in fp32 (losses are computed in fp32 after a bf16 forward)."""
        return VAEOutput(self.recon.float(), self.mu.float(), self.log_var.float(), self.z.float())


class VAE(nn.Module):
    """Base class: subclasses implement `encode` and `decode`; the rest is shared.

    `decoder_output` says what `decode` returns: "tanh" (an image in [-1, 1]) or "logits"
    (Bernoulli logits of pixels in [0, 1]).
    """

    latent_dim: int
    decoder_output: str

    def encode(self, x: Tensor) -> Posterior:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        posterior = self.encode(x)
        z = posterior.rsample(generator)
        return VAEOutput(recon=self.decode(z), mu=posterior.mu, log_var=posterior.log_var, z=z)

    def to_image(self, decoded: Tensor) -> Tensor:
        """Map decoder output to an image in the data's own range (for grids and MSE)."""
        return torch.sigmoid(decoded) if self.decoder_output == "logits" else decoded

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> Tensor:
        """Decode n draws from the prior N(0, I); returns images in the data's range."""
        device = device or next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return self.to_image(self.decode(z))
