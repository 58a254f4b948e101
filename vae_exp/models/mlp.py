"""The fully connected VAE of Kingma & Welling 2013 (arXiv:1312.6114, appendix C), with one
hidden layer each way, or several (Burda et al. 2015's one-stochastic-layer model: two layers of
200 tanh units each way)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vae_exp.config import is_count
from vae_exp.models.base import VAE, Posterior
from vae_exp.models.conv import check_decoder_output

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
    """Kingma & Welling's MLP VAE: deterministic hidden layers each way.

    Encoder: act(W x + b) on the flattened image (C*S*S values), once per hidden layer, then one
    linear layer to [mu, log_var] (the paper's two output layers W4, W5 side by side). Decoder:
    the mirror image from z, then a linear layer to C*S*S values reshaped to [C, S, S]: Bernoulli
    logits (decoder_output="logits", the paper's MNIST decoder) or through Tanh
    (decoder_output="tanh", for the MSE loss on data in [-1, 1]). Any image size works.

    The hidden layers are `hidden_dim` (one layer of that width: Kingma & Welling) or
    `hidden_dims` (widths from the image inwards, e.g. [200, 200] for Burda et al. 2015; the
    decoder runs them in reverse); exactly one of the two is given. `hidden_dims=[n]` is the
    same model, with the same parameter names, as `hidden_dim=n`.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        latent_dim: int = 20,
        hidden_dim: int | None = 500,
        activation: str = "tanh",
        decoder_output: str = "tanh",
        hidden_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        for key, value in (
            ("in_channels", in_channels),
            ("image_size", image_size),
            ("latent_dim", latent_dim),
        ):
            if not is_count(value):
                raise ValueError(f"model.{key}={value!r}; allowed: an integer >= 1")
        widths = hidden_widths(hidden_dim, hidden_dims)
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r}; allowed: {' | '.join(ACTIVATIONS)}")
        check_decoder_output(decoder_output)
        self.latent_dim = latent_dim
        self.decoder_output = decoder_output
        self.image_shape = (in_channels, image_size, image_size)
        pixels = in_channels * image_size * image_size

        self.encoder = mlp([pixels, *widths, 2 * latent_dim], activation)
        self.decoder = mlp([latent_dim, *reversed(widths), pixels], activation)
        if decoder_output == "tanh":
            self.decoder.append(nn.Tanh())

    def encode(self, x: Tensor, y: Tensor | None = None) -> Posterior:
        mu, log_var = torch.chunk(self.encoder(torch.flatten(x, 1)), 2, dim=1)
        return Posterior(mu=mu, log_var=log_var)

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.decoder(z).unflatten(-1, self.image_shape)


def hidden_widths(hidden_dim: int | None, hidden_dims: Sequence[int] | None) -> list[int]:
    """The hidden layers' widths from `hidden_dim` (one layer) or `hidden_dims` (a list); a
    ValueError naming the keys unless exactly one of them is given and valid."""
    if hidden_dims is None:
        if not is_count(hidden_dim):
            raise ValueError(
                f"model.hidden_dim={hidden_dim!r}; allowed: an integer >= 1 (one hidden layer), "
                "or null with model.hidden_dims a list of widths"
            )
        return [hidden_dim]
    if hidden_dim is not None:
        raise ValueError(
            f"model.hidden_dim={hidden_dim!r} and model.hidden_dims={list(hidden_dims)!r} are "
            "both set; allowed: one of them (set model.hidden_dim=null to use hidden_dims)"
        )
    if isinstance(hidden_dims, str) or not isinstance(hidden_dims, Sequence):
        raise ValueError(
            f"model.hidden_dims={hidden_dims!r}; allowed: a non-empty list of integers >= 1"
        )
    widths = list(hidden_dims)  # a copy: the config's list is never mutated
    if not widths or not all(is_count(w) for w in widths):
        raise ValueError(
            f"model.hidden_dims={widths!r}; allowed: a non-empty list of integers >= 1"
        )
    return widths
