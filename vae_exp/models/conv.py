"""The original script's conv VAE, from encoder / decoder builders any conv model shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vae_exp.config import is_count
from vae_exp.models.base import DECODER_OUTPUTS, VAE, Posterior


def check_decoder_output(decoder_output: str) -> None:
    if decoder_output not in DECODER_OUTPUTS:
        raise ValueError(
            f"decoder_output={decoder_output!r}; allowed: {' | '.join(DECODER_OUTPUTS)}"
        )


def check_conv_args(
    image_size: int, latent_dim: int, hidden_dims: Sequence[int], decoder_output: str
) -> list[int]:
    """The checks every conv VAE makes on its arguments (ValueErrors naming the config key);
    returns hidden_dims as a new list (the config's list is never mutated)."""
    if isinstance(hidden_dims, str) or not isinstance(hidden_dims, Sequence):
        raise ValueError(f"model.hidden_dims={hidden_dims!r} must be a list of integers >= 1")
    hidden_dims = list(hidden_dims)
    if not hidden_dims or not all(is_count(d) for d in hidden_dims):
        raise ValueError(
            f"model.hidden_dims={hidden_dims} must be a non-empty list of integers >= 1"
        )
    if not is_count(latent_dim):
        raise ValueError(f"model.latent_dim={latent_dim!r} must be an integer >= 1")
    factor = 2 ** len(hidden_dims)
    if image_size % factor:
        raise ValueError(
            f"data.image_size={image_size} is not divisible by 2**len(model.hidden_dims)="
            f"{factor}; use an image size that is a multiple of {factor} or fewer hidden_dims"
        )
    check_decoder_output(decoder_output)
    return hidden_dims


def conv_encoder(in_channels: int, hidden_dims: Sequence[int]) -> nn.Sequential:
    """One [Conv 3x3 stride 2, BatchNorm, LeakyReLU] block per entry; each halves H and W."""
    layers: list[nn.Module] = []
    for dim in hidden_dims:
        layers += [nn.Conv2d(in_channels, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.LeakyReLU()]
        in_channels = dim
    return nn.Sequential(*layers)


def conv_decoder(out_channels: int, hidden_dims: Sequence[int], output: str) -> nn.Sequential:
    """The encoder's mirror: ConvTranspose blocks from hidden_dims[-1] back to hidden_dims[0],
    one more ConvTranspose block at hidden_dims[0], then Conv 3x3 to out_channels and the output
    layer (Tanh, or nothing for logits). Doubles H and W once per entry of hidden_dims."""
    dims = list(reversed(hidden_dims))  # a copy: the config's list is never mutated
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [
            nn.ConvTranspose2d(d_in, d_out, 3, 2, 1, 1),
            nn.BatchNorm2d(d_out),
            nn.LeakyReLU(),
        ]
    last = dims[-1]
    layers += [
        nn.ConvTranspose2d(last, last, 3, 2, 1, 1),
        nn.BatchNorm2d(last),
        nn.LeakyReLU(),
        nn.Conv2d(last, out_channels, 3, 1, 1),
    ]
    if output == "tanh":
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class ConvVAE(VAE):
    """Conv VAE of the original script (AntixK/PyTorch-VAE's VanillaVAE) for any image size
    divisible by 2 ** len(hidden_dims). Modules are created in the original script's order, so
    the same random seed gives the same initial weights."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        latent_dim: int = 128,
        hidden_dims: Sequence[int] = (32, 64, 128, 256, 512),
        decoder_output: str = "tanh",
    ) -> None:
        super().__init__()
        hidden_dims = check_conv_args(image_size, latent_dim, hidden_dims, decoder_output)
        factor = 2 ** len(hidden_dims)
        self.latent_dim = latent_dim
        self.decoder_output = decoder_output
        self.hidden_dims = tuple(hidden_dims)
        self.feature_shape = (hidden_dims[-1], image_size // factor, image_size // factor)
        features = hidden_dims[-1] * (image_size // factor) ** 2

        self.encoder = conv_encoder(in_channels, hidden_dims)
        self.fc_mu = nn.Linear(features, latent_dim)
        self.fc_var = nn.Linear(features, latent_dim)
        self.decoder_input = nn.Linear(latent_dim, features)
        self.decoder = conv_decoder(in_channels, hidden_dims, decoder_output)

    def encode(self, x: Tensor, y: Tensor | None = None) -> Posterior:
        h = torch.flatten(self.encoder(x), 1)
        return Posterior(mu=self.fc_mu(h), log_var=self.fc_var(h))

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.decoder_input(z).view(-1, *self.feature_shape)
        return self.decoder(h)
