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

    def rsample(
        self, generator: torch.Generator | None = None, eps: Tensor | None = None
    ) -> Tensor:
        """Reparameterised draw z = mu + eps * sigma with eps ~ N(0, I): drawn here (from
        `generator` when given), or the given standard-normal `eps` (shaped like mu, or with a
        leading sample axis)."""
        std = torch.exp(0.5 * self.log_var)
        if eps is None and generator is None:
            eps = torch.randn_like(std)
        elif eps is None:
            eps = torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)
        return self.mu + eps.to(std.dtype) * std


@dataclass
class VAEOutput:
    """What `VAE.forward` returns: the decoder output for posterior samples, and the samples.

    With `samples=1` (the default) `z` is [B, D] and `recon` [B, C, H, W]; with `samples=k`
    they get a leading sample axis: z [k, B, D], recon [k, B, C, H, W]. `mu`, `log_var` are
    always [B, D]."""

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
    (Bernoulli logits of pixels in [0, 1]). `num_classes` > 0 marks a conditional model:
    `encode` and `decode` then need the class labels `y` (int64, shape [B]); unconditional
    models ignore `y`.
    """

    latent_dim: int
    decoder_output: str
    num_classes: int = 0

    def encode(self, x: Tensor, y: Tensor | None = None) -> Posterior:
        raise NotImplementedError

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        samples: int = 1,
        generator: torch.Generator | None = None,
        eps: Tensor | None = None,
    ) -> VAEOutput:
        """Encode `x`, draw `samples` reparameterised z per image, decode them. `eps`: the
        standard-normal noise to use instead of drawing it ([B, D]; [samples, B, D])."""
        posterior = self.encode(x, y)
        if samples == 1:
            z = posterior.rsample(generator, eps)
            recon = self.decode(z, y)
        else:
            if eps is None:
                z = torch.stack([posterior.rsample(generator) for _ in range(samples)])
            else:
                z = posterior.rsample(eps=eps)
            ys = None if y is None else y.repeat(samples)  # matches z.flatten(0, 1)
            recon = self.decode(z.flatten(0, 1), ys).unflatten(0, (samples, len(x)))
        return VAEOutput(recon=recon, mu=posterior.mu, log_var=posterior.log_var, z=z)

    def to_image(self, decoded: Tensor) -> Tensor:
        """Map decoder output to an image in the data's own range (for grids and MSE)."""
        return torch.sigmoid(decoded) if self.decoder_output == "logits" else decoded

    def _prior_draws(self, n: int, generator: torch.Generator | None) -> Tensor:
        """n draws z ~ N(0, I) on the model's device, made on the generator's device (a CPU
        generator gives the same draws whatever the model's device)."""
        device = next(self.parameters()).device
        where = generator.device if generator is not None else device
        return torch.randn(n, self.latent_dim, generator=generator, device=where).to(device)

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, y: Tensor | None = None
    ) -> Tensor:
        """Decode n draws from the prior N(0, I) (for class labels `y` if conditional);
        returns images in the data's range."""
        return self.to_image(self.decode(self._prior_draws(n, generator), y))

    @torch.no_grad()
    def class_grid(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """A conditional model's samples, class by class: the same n prior draws decoded for
        each class (n * num_classes images; a grid with n columns has one row per class)."""
        z = self._prior_draws(n, generator).repeat(self.num_classes, 1)
        y = torch.arange(self.num_classes, device=z.device).repeat_interleave(n)
        return self.to_image(self.decode(z, y))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Images decoded from the posterior mean of `x` (labels `y` if conditional)."""
        return self.to_image(self.decode(self.encode(x, y).mu, y))
