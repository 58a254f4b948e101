"""Image grids and the choice of W&B mode."""

import numpy as np
import pytest
import torch

from vae_exp.tracking import image_grid, wandb_mode

KEY = "a" * 40


def test_grid_maps_the_value_range_to_uint8_without_stretching():
    images = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 0.0, 1.0, 0.5)])
    grid = image_grid(images, nrow=4, value_range=(-1.0, 1.0))
    assert grid.dtype == np.uint8 and grid.shape == (4 + 4, 4 * 4 + 5 * 2)
    tiles = [grid[2:6, 2 + i * 6 : 6 + i * 6] for i in range(4)]
    assert [int(t.mean()) for t in tiles] == [0, 128, 255, 191]
    rgb = image_grid(torch.rand(2, 3, 4, 4), nrow=2, value_range=(0.0, 1.0))
    assert rgb.shape == (8, 14, 3)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_auto_is_offline_without_credentials(clean_env):
    assert wandb_mode("auto") == "offline"


def test_auto_is_online_with_an_api_key(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_mode("auto") == "online"


@pytest.mark.parametrize("host", ["api.wandb.ai", "api.forge.coreweave.com"])
def test_auto_is_online_after_wandb_login(clean_env, host):
    clean_env.write_text(f"machine {host}\n  login user\n  password {KEY}\n")
    clean_env.chmod(0o600)
    assert wandb_mode("auto") == "online"


def test_netrc_for_another_server_does_not_count(clean_env, monkeypatch):
    clean_env.write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    clean_env.chmod(0o600)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode("auto") == "offline"


def test_explicit_mode_and_environment(clean_env, monkeypatch):
    assert wandb_mode("online") == "online" and wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("online") is None  # wandb reads WANDB_MODE itself: it wins
