"""Image grids, the choice of W&B mode, and starting W&B for real (in a subprocess)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import cli_env
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
    monkeypatch.setenv("WANDB_MODE", "")
    assert wandb_mode("auto") == "offline"  # set but empty: as if unset


# Start a Tracker with logger=wandb (mode, init_timeout from argv); print the seconds it took,
# the W&B run's mode and whether WANDB_MODE is still in the environment.
START_TRACKER = """
import os, sys, time
from pathlib import Path
import wandb  # before the clock starts: the test times W&B's start, not the import
from vae_exp.config import LoggerConfig
from vae_exp.tracking import Tracker

logger = LoggerConfig(name="wandb", mode=sys.argv[2], init_timeout=float(sys.argv[3]))
start = time.monotonic()
tracker = Tracker(Path(sys.argv[1]), {"a": 1}, logger)
seconds = time.monotonic() - start
mode = tracker.wandb_run.settings.mode if tracker.wandb_run else None
print("started:", seconds, mode, "WANDB_MODE" in os.environ, flush=True)
tracker.finish()
"""


def start_tracker(run_dir, mode: str, init_timeout: float, env: dict[str, str]):
    """(seconds, W&B mode, WANDB_MODE still set) of a Tracker started in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", START_TRACKER, str(run_dir), mode, str(init_timeout)],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("started:")]
    seconds, run_mode, env_set = line.split()[1:]
    return float(seconds), run_mode, env_set == "True", result.stdout + result.stderr


def test_unreachable_wandb_falls_back_offline_within_the_timeout(tmp_path):
    # Nothing listens on 127.0.0.1:9 (connection refused). W&B tries online until
    # init_timeout, then the run logs offline. The bound: wandb's account ("viewer") query,
    # which vae_exp turns off, would add 5 s on its own (twice, before the fix). wandb makes
    # that query for its "logged in as" line, so not when silent (conftest's default).
    init_timeout = 3
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": KEY, "WANDB_SILENT": "false"}
    seconds, mode, _, output = start_tracker(tmp_path, "online", init_timeout, env)
    assert mode == "offline" and "could not start online" in output, output[-3000:]
    assert init_timeout <= seconds < init_timeout + 5, seconds


def test_empty_wandb_mode_counts_as_unset(tmp_path):
    _, mode, env_set, output = start_tracker(tmp_path, "offline", 60, {"WANDB_MODE": ""})
    assert mode == "offline" and not env_set, output[-3000:]
    assert "ValidationError" not in output and list(tmp_path.glob("wandb/offline-run-*"))
