"""VAE models: one interface (`VAE`), shared conv builders, one file per model family."""

from vae_exp.models.base import VAE, Posterior, VAEOutput
from vae_exp.models.conditional import ConditionalConvVAE
from vae_exp.models.conv import ConvVAE
from vae_exp.models.mlp import MLPVAE

__all__ = [
    "VAE",
    "Posterior",
    "VAEOutput",
    "ConvVAE",
    "ConditionalConvVAE",
    "MLPVAE",
]
