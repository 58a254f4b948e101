"""vae_exp: Hydra-configured variational autoencoder experiments."""

__version__ = "0.1.0"
