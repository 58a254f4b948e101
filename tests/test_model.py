"""The conv VAE for many shapes, through the one model interface."""

import pytest
import torch

from vae_exp.models import ConvVAE, VAEOutput


@pytest.mark.parametrize(
    ("hidden_dims", "latent_dim", "size", "channels"),
    [
        ([32, 64, 128, 256, 512], 128, 32, 1),
        ([32, 64, 128, 256, 512], 16, 64, 3),
        ([8], 2, 28, 1),
        ([8, 16], 1, 28, 3),
        ([4, 8, 16], 10, 16, 1),
        ([16, 16, 32, 32], 32, 48, 3),
    ],
)
def test_shapes(hidden_dims, latent_dim, size, channels):
    model = ConvVAE(channels, size, latent_dim, hidden_dims)
    x = torch.randn(3, channels, size, size).clamp(-1, 1)
    out = model(x)
    assert isinstance(out, VAEOutput)
    assert out.recon.shape == x.shape
    assert out.mu.shape == out.log_var.shape == out.z.shape == (3, latent_dim)
    assert out.recon.abs().max() <= 1  # Tanh output
    posterior = model.encode(x)
    assert model.decode(posterior.mu).shape == x.shape
    assert model.sample(4).shape == (4, channels, size, size)


def test_config_list_is_not_mutated():
    dims = [8, 16, 32]
    model = ConvVAE(1, 32, 4, dims)
    assert dims == [8, 16, 32] and model.hidden_dims == (8, 16, 32)


def test_noise_comes_from_the_given_generator():
    model = ConvVAE(1, 32, 4, [8, 16]).eval()
    x = torch.randn(2, 1, 32, 32)
    a = model(x, generator=torch.Generator().manual_seed(1)).z
    b = model(x, generator=torch.Generator().manual_seed(1)).z
    c = model(x, generator=torch.Generator().manual_seed(2)).z
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_dims": []}, "hidden_dims"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"image_size": 30}, "image_size=30 is not divisible"),
        ({"decoder_output": "relu"}, "decoder_output"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"in_channels": 1, "image_size": 32, "latent_dim": 4, "hidden_dims": [8, 16]} | kwargs
    with pytest.raises(ValueError, match=message):
        ConvVAE(**args)
