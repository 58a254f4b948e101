"""With no overrides, vae_exp is the seed's experiment: same settings, data, weights, loss, step."""

import importlib.util

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from tests.conftest import REPO, compose_cfg
from tests.seed_reference import SeedVAE, seed_loss
from vae_exp.build import build_experiment, build_model, build_optimizer
from vae_exp.data import load_idx_split, normalize, prepare_images
from vae_exp.distributed import Cluster
from vae_exp.train import validate


def test_defaults_are_the_seed_settings():
    cfg = compose_cfg()
    assert cfg.data.name == "mnist" and cfg.data.image_size == 32 and cfg.data.channels == 1
    assert cfg.data.batch_size == 64 and cfg.data.train_split == "train"
    assert cfg.model.latent_dim == 128 and list(cfg.model.hidden_dims) == [32, 64, 128, 256, 512]
    assert cfg.optim.optimizer._target_ == "torch.optim.Adam" and cfg.optim.optimizer.lr == 5e-4
    assert cfg.optim.get("scheduler") is None
    assert cfg.loss._target_ == "vae_exp.losses.MSEKLD" and cfg.loss.w == 0.00025
    assert cfg.trainer.epochs == 100 and cfg.trainer.sample_grid == 5
    assert cfg.logger.name == "wandb"


def test_data_matches_the_seed_transforms(mnist_root):
    images, _ = load_idx_split("mnist", mnist_root, "train", download=False)  # the seed's data
    ours = normalize(prepare_images(images[:200], 32, 1), (-1.0, 1.0))
    seed_transform = transforms.Compose(
        [transforms.Resize(32), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    )
    # torchvision's MNIST hands the transform Image.fromarray(uint8 28x28, mode L)
    theirs = torch.stack([seed_transform(Image.fromarray(a, mode="L")) for a in images[:200]])
    assert ours.shape == (200, 1, 32, 32)
    assert torch.equal(ours, theirs)
    assert ours.min() == -1 and ours.max() == 1


def test_same_weights_loss_and_adam_step_as_the_seed(mnist_root):
    cfg = compose_cfg()
    images, _ = load_idx_split("mnist", mnist_root, "train", download=False)
    x = normalize(prepare_images(images[:64], 32, 1), (-1.0, 1.0))

    torch.manual_seed(123)
    seed_model = SeedVAE((1, 32, 32), 128)
    seed_opt = torch.optim.Adam(seed_model.parameters(), lr=5e-4)
    torch.manual_seed(123)
    loss_fn = instantiate(cfg.loss)
    model = build_model(cfg, loss_fn)
    optimizer, _ = build_optimizer(cfg, model, epochs=3)

    seed_state, our_state = seed_model.state_dict(), model.state_dict()
    assert list(seed_state) == list(our_state)
    assert all(torch.equal(seed_state[k], our_state[k]) for k in seed_state)

    for _ in range(3):  # three steps: same noise stream, same loss, same updated weights
        state = torch.random.get_rng_state()
        seed_opt.zero_grad()
        y, _, mu, log_var = seed_model(x)
        expected = seed_loss(y, x, mu, log_var)
        expected.backward()
        seed_opt.step()

        torch.random.set_rng_state(state)
        optimizer.zero_grad()
        terms = loss_fn(model(x), x)
        terms["loss"].backward()
        optimizer.step()
        assert torch.equal(terms["loss"], expected)

    assert all(torch.equal(seed_model.state_dict()[k], model.state_dict()[k]) for k in seed_state)
    # and the original config list was not reversed in place (the seed's hidden_dims.reverse())
    assert list(cfg.model.hidden_dims) == [32, 64, 128, 256, 512]


def test_prior_samples_decode_like_the_seed():
    cfg = compose_cfg()
    torch.manual_seed(0)
    seed_model = SeedVAE((1, 32, 32), 128).eval()
    torch.manual_seed(0)
    loss_fn = instantiate(cfg.loss)
    model = build_model(cfg, loss_fn).eval()
    z = torch.randn(25, 128)
    with torch.no_grad():
        assert torch.equal(model.decode(z), seed_model.decode(z))
    assert np.isfinite(model.sample(25).numpy()).all()


def test_the_original_loops_validation_is_vae_exps(mnist_root, tmp_path):
    """benchmarks/original_vs_vaeexp.py (the README's "original script vs vae_exp" table)
    validates the seed's model through torchvision's MNIST and DataLoader as vae_exp's
    `validate` does: same weights and test images, noise from seed 0 -> the same number."""
    spec = importlib.util.spec_from_file_location(
        "original_vs_vaeexp", REPO / "benchmarks" / "original_vs_vaeexp.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = script.unpack_mnist(mnist_root, tmp_path)
    loader = DataLoader(script.first(script.mnist(root, train=False), 256), batch_size=64)
    torch.manual_seed(0)
    seed_model = SeedVAE((1, 32, 32), 128)
    theirs = script.validate(seed_model, loader, torch.device("cpu"), seed=0)

    cfg = compose_cfg([f"data.root={mnist_root}", "data.limit=256", "trainer.seed=0"])
    exp = build_experiment(cfg, Cluster(), torch.device("cpu"))
    exp.model.load_state_dict(seed_model.state_dict())
    assert exp.data.val.num_examples == 256
    assert validate(exp)["loss"] == pytest.approx(theirs, rel=1e-6)
