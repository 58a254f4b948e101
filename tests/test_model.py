"""The conv VAE for many shapes, through the one model interface."""

import pytest
import torch

from tests.conftest import compose_cfg
from vae_exp.data import load_idx_split, normalize, prepare_images
from vae_exp.losses import BCEKLD, MSEKLD
from vae_exp.models import MLPVAE, ConditionalConvVAE, ConvVAE, VAEOutput


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


# --------------------------------------------------------------------------------------------
# MLPVAE (Kingma & Welling 2013, appendix C)


@pytest.mark.parametrize("decoder_output", ["tanh", "logits"])
@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 1), (28, 3), (32, 3)])
def test_mlp_shapes(size, channels, decoder_output):
    model = MLPVAE(channels, size, latent_dim=5, hidden_dim=32, decoder_output=decoder_output)
    x = torch.rand(3, channels, size, size)
    out = model(x)
    assert out.recon.shape == x.shape
    assert out.mu.shape == out.log_var.shape == out.z.shape == (3, 5)
    if decoder_output == "tanh":
        assert out.recon.abs().max() <= 1
    k = model(x, samples=4)
    assert k.recon.shape == (4, 3, channels, size, size) and k.z.shape == (4, 3, 5)
    assert k.mu.shape == (3, 5)
    images = model.sample(6)
    assert images.shape == (6, channels, size, size)
    assert images.min() >= (-1 if decoder_output == "tanh" else 0) and images.max() <= 1


def test_mlp_is_the_papers_architecture():
    model = MLPVAE(1, 28)  # defaults: latent 20, hidden 500, tanh
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 500),
        (500, 40),  # mu and log_var
        (20, 500),
        (500, 784),
    ]
    assert sum(isinstance(m, torch.nn.Tanh) for m in model.encoder) == 1
    assert not isinstance(MLPVAE(1, 28, decoder_output="logits").decoder[-1], torch.nn.Tanh)


def test_mlp_relu_activation():
    model = MLPVAE(1, 28, latent_dim=4, hidden_dim=16, activation="relu")
    assert any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Tanh) for m in model.encoder)
    assert model(torch.rand(2, 1, 28, 28)).recon.shape == (2, 1, 28, 28)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_dim": 0}, "model.hidden_dim=0"),
        ({"hidden_dim": 2.5}, "model.hidden_dim=2.5"),
        ({"latent_dim": 0}, "model.latent_dim=0"),
        ({"activation": "sigmoid"}, "model.activation='sigmoid'; allowed: tanh | relu"),
        ({"decoder_output": "relu"}, "decoder_output"),
    ],
)
def test_mlp_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("|", r"\|")):
        MLPVAE(**({"in_channels": 1, "image_size": 28} | kwargs))


# --------------------------------------------------------------------------------------------
# ConditionalConvVAE


def small_cvae(**kwargs) -> ConditionalConvVAE:
    args = {"in_channels": 1, "image_size": 28, "latent_dim": 4, "hidden_dims": [8, 16]}
    return ConditionalConvVAE(**(args | kwargs))


def test_conditional_shapes():
    model = small_cvae(in_channels=3, image_size=32, num_classes=5)
    x, y = torch.randn(3, 3, 32, 32).clamp(-1, 1), torch.tensor([0, 4, 2])
    out = model(x, y)
    assert out.recon.shape == x.shape and out.z.shape == (3, 4)
    k = model(x, y, samples=3)
    assert k.recon.shape == (3, 3, 3, 32, 32) and k.z.shape == (3, 3, 4)
    assert k.mu.shape == k.log_var.shape == (3, 4)
    assert model.encoder[0].in_channels == 3 + 5  # image + one-hot label channels
    assert model.decoder_input.in_features == 4 + 5  # z + one-hot label


def test_conditional_decoder_depends_on_the_label():
    model = small_cvae().eval()
    z = torch.randn(1, 4).expand(10, 4)
    images = model.decode(z, torch.arange(10))
    for i in range(1, 10):
        assert not torch.allclose(images[0], images[i])
    assert torch.allclose(model.decode(z[:2], torch.tensor([3, 3]))[0], images[3], atol=1e-6)
    x = torch.rand(1, 1, 28, 28)
    mu0 = model.encode(x, torch.tensor([0])).mu
    assert not torch.allclose(mu0, model.encode(x, torch.tensor([1])).mu)  # encoder sees y too


def test_conditional_samples_per_class():
    model = small_cvae(num_classes=3, decoder_output="logits").eval()
    images = model.class_grid(2, torch.Generator().manual_seed(0))
    assert images.shape == (6, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    zeros = model.sample(2, torch.Generator().manual_seed(0), y=torch.zeros(2, dtype=torch.long))
    # the same noise: the same images for the class-0 row, other images for the other classes
    assert torch.allclose(zeros, images[:2], atol=1e-6)
    assert not torch.allclose(images[2:4], images[:2])
    assert not torch.allclose(images[4:], images[:2])
    twos = model.sample(2, torch.Generator().manual_seed(0), y=torch.full((2,), 2))
    assert torch.allclose(twos, images[4:], atol=1e-6)  # class-major: rows 0, 1, 2


def test_reconstruct_decodes_the_posterior_mean():
    model = small_cvae(num_classes=3, decoder_output="logits").eval()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 0])
    expected = torch.sigmoid(model.decode(model.encode(x, y).mu, y))
    assert torch.allclose(model.reconstruct(x, y), expected)


@pytest.mark.parametrize(
    ("y", "message"),
    [
        (None, "needs class labels y"),
        (torch.tensor([0, 10]), r"range over 0\.\.10; model\.num_classes=10"),
        (torch.tensor([-1, 3]), r"model\.num_classes=10, so labels must be in 0\.\.9"),
        (torch.tensor([0.0, 1.0]), "integer tensor"),
        (torch.tensor([1, 2, 3]), r"shape \(3,\); expected \(2,\)"),
    ],
)
def test_conditional_bad_labels(y, message):
    model = small_cvae()
    with pytest.raises(ValueError, match=message):
        model(torch.rand(2, 1, 28, 28), y)
    with pytest.raises(ValueError, match=message):
        model.sample(2, y=y)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, r"model\.num_classes=0"),
        ({"image_size": 30}, "image_size=30 is not divisible"),
        ({"hidden_dims": []}, "hidden_dims"),
    ],
)
def test_conditional_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_cvae(**kwargs)


# --------------------------------------------------------------------------------------------
# Both new models train on real MNIST and build from their configs


@pytest.fixture(scope="module")
def mnist_batch(mnist_root):
    """The first 512 real MNIST training digits in [0, 1] at 28 px, and their labels."""
    images, labels = load_idx_split("mnist", mnist_root, "train", download=False)
    x = normalize(prepare_images(images[:512], 28, 1), (0.0, 1.0))
    return x, torch.as_tensor(labels[:512].astype("int64"))


@pytest.mark.parametrize(
    "make",
    [
        lambda: MLPVAE(1, 28, decoder_output="logits"),
        lambda: small_cvae(latent_dim=8, decoder_output="logits"),
    ],
    ids=["mlp", "conditional"],
)
def test_trains_on_mnist(make, mnist_batch):
    torch.manual_seed(0)
    model, loss_fn = make(), BCEKLD()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all, y_all = mnist_batch
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(20):
        idx = slice(64 * (step % 8), 64 * (step % 8 + 1))
        x, y = x_all[idx], y_all[idx]
        optimizer.zero_grad()
        loss = loss_fn(model(x, y if model.num_classes else None, generator=g), x)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("model_name", ["mlp_vae", "conditional_conv_vae"])
@pytest.mark.parametrize("loss_cls", [BCEKLD, MSEKLD], ids=["bce_kld", "mse_kld"])
def test_new_model_configs_build(model_name, loss_cls):
    from vae_exp.build import build_model

    loss = "bce_kld" if loss_cls is BCEKLD else "mse_kld"
    cfg = compose_cfg(
        [f"model={model_name}", f"loss={loss}", "data.image_size=28"]
        + (["model.hidden_dims=[8,16]"] if model_name != "mlp_vae" else [])
    )
    loss_fn = loss_cls()
    model = build_model(cfg, loss_fn)
    assert model.decoder_output == loss_fn.decoder_output
    expected = MLPVAE if model_name == "mlp_vae" else ConditionalConvVAE
    assert type(model) is expected and model.num_classes == (10 if expected is not MLPVAE else 0)
    x = torch.rand(2, 1, 28, 28)
    y = torch.tensor([3, 7]) if model.num_classes else None
    assert model(x, y).recon.shape == x.shape
