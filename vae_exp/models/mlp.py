"""The fully connected VAE of Kingma & Welling 2013 (arXiv:1312.6114, appendix C)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vae_exp.models.base import VAE, Posterior
from vae_exp.models.conv import check_decoder_output, is_count

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers sizes[0] -> sizes[1] -> ... -> sizes[-1], with `activation` after every
    layer but the last (the output layer is linear)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class MLPVAE(VAE):
    """Kingma & Welling's MLP VAE: one hidden layer each way.

    Encoder: h = act(W x + b) on the flattened image (C*S*S values), then one linear layer to
    [mu, log_var] (the paper's two output layers W4, W5 side by side). Decoder: act(W z + b),
    then a linear layer to C*S*S values reshaped to [C, S, S]: Bernoulli logits
    (decoder_output="logits", the paper's MNIST decoder) or through Tanh (decoder_output="tanh",
    for the MSE loss on data in [-1, 1]). Any image size works (no divisibility constraint).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        latent_dim: int = 20,
        hidden_dim: int = 500,
        activation: str = "tanh",
        decoder_output: str = "tanh",
    ) -> None:
        super().__init__()
        for key, value in (
            ("in_channels", in_channels),
            ("image_size", image_size),
            ("latent_dim", latent_dim),
            ("hidden_dim", hidden_dim),
        ):
            if not is_count(value):
                raise ValueError(f"model.{key}={value!r}; allowed: an integer >= 1")
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r}; allowed: {' | '.join(ACTIVATIONS)}")
        check_decoder_output(decoder_output)
        self.latent_dim = latent_dim
        self.decoder_output = decoder_output
        self.image_shape = (in_channels, image_size, image_size)
        pixels = in_channels * image_size * image_size

        self.encoder = mlp([pixels, hidden_dim, 2 * latent_dim], activation)
        self.decoder = mlp([latent_dim, hidden_dim, pixels], activation)
        if decoder_output == "tanh":
            self.decoder.append(nn.Tanh())

    def encode(self, x: Tensor, y: Tensor | None = None) -> Posterior:
        mu, log_var = torch.chunk(self.encoder(torch.flatten(x, 1)), 2, dim=1)
        return Posterior(mu=mu, log_var=log_var)

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.decoder(z).unflatten(-1, self.image_shape)
