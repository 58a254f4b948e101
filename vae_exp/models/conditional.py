"""A conv VAE conditioned on class labels (a CVAE, Sohn et al. 2015), from the conv builders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_exp.config import is_count
from vae_exp.models.base import VAE, Posterior
from vae_exp.models.conv import check_conv_args, conv_decoder, conv_encoder


def check_labels(y: Tensor | None, n: int, num_classes: int) -> None:
    """Class labels must be an integer tensor of shape [n] with values in [0, num_classes).

    The range is checked with a ValueError on the CPU; on an accelerator, and inside
    torch.compile, it is checked asynchronously (a RuntimeError carrying the same message, when
    the device reports it), so that training neither waits on the device every step nor breaks
    the compiled graph (or a CUDA graph capture)."""
    hint = f"model.num_classes={num_classes}, so labels must be in 0..{num_classes - 1}"
    if y is None:
        raise ValueError(
            f"this conditional model needs class labels y (int64, shape [{n}]; {hint}): "
            "call model(x, y), model.encode(x, y), model.decode(z, y) or "
            "model.sample(n, y=labels) (model.class_grid(n) for a grid)"
        )
    if not isinstance(y, Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"class labels y must be an integer tensor; got {y!r}")
    if y.shape != (n,):
        raise ValueError(
            f"class labels y have shape {tuple(y.shape)}; expected ({n},), one per image"
        )
    if y.device.type == "cpu" and not torch.compiler.is_compiling():
        if n and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"class labels y range over {int(y.min())}..{int(y.max())}; {hint}")
    else:
        torch._assert_async(
            ((y >= 0) & (y < num_classes)).all(), f"class labels out of range; {hint}"
        )


class ConditionalConvVAE(VAE):
    """ConvVAE conditioned on class labels y in [0, num_classes).

    Encoder: conv_encoder on the image with the one-hot label appended as `num_classes`
    constant input channels (channel C + k is all ones for class k, zeros elsewhere), then
    fc_mu / fc_var as in ConvVAE. Decoder: decoder_input takes concat(z, one_hot(y)), then
    conv_decoder. `encode`, `decode`, `forward` and `sample` need y (int64, shape [B]); a
    missing or out-of-range y is an error. Images must be divisible by 2 ** len(hidden_dims).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        latent_dim: int = 128,
        hidden_dims: Sequence[int] = (32, 64, 128, 256, 512),
        num_classes: int = 10,
        decoder_output: str = "tanh",
    ) -> None:
        super().__init__()
        hidden_dims = check_conv_args(image_size, latent_dim, hidden_dims, decoder_output)
        if not is_count(num_classes):
            raise ValueError(
                f"model.num_classes={num_classes!r}; allowed: an integer >= 1 (the number of "
                "class labels; for an unconditional model use model=conv_vae)"
            )
        factor = 2 ** len(hidden_dims)
        self.latent_dim = latent_dim
        self.decoder_output = decoder_output
        self.num_classes = num_classes
        self.hidden_dims = tuple(hidden_dims)
        self.feature_shape = (hidden_dims[-1], image_size // factor, image_size // factor)
        features = hidden_dims[-1] * (image_size // factor) ** 2

        self.encoder = conv_encoder(in_channels + num_classes, hidden_dims)
        self.fc_mu = nn.Linear(features, latent_dim)
        self.fc_var = nn.Linear(features, latent_dim)
        self.decoder_input = nn.Linear(latent_dim + num_classes, features)
        self.decoder = conv_decoder(in_channels, hidden_dims, decoder_output)

    def one_hot(self, y: Tensor | None, n: int, dtype: torch.dtype) -> Tensor:
        """The labels checked and one-hot encoded: [n, num_classes] of `dtype`."""
        check_labels(y, n, self.num_classes)
        return F.one_hot(y.long(), self.num_classes).to(dtype)

    def encode(self, x: Tensor, y: Tensor | None = None) -> Posterior:
        labels = self.one_hot(y, len(x), x.dtype)
        maps = labels[:, :, None, None].expand(-1, -1, *x.shape[2:])
        h = torch.flatten(self.encoder(torch.cat([x, maps], dim=1)), 1)
        return Posterior(mu=self.fc_mu(h), log_var=self.fc_var(h))

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        zy = torch.cat([z, self.one_hot(y, len(z), z.dtype)], dim=1)
        return self.decoder(self.decoder_input(zy).view(-1, *self.feature_shape))
