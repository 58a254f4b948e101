"""Shared fixtures: paths to the real data, Hydra composition, and running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"  # real MNIST test split (10,000 images)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist

# A small model and a few real images: enough to exercise every path in seconds on a CPU.
TINY = [
    f"data.root={SHARED_DATA}",
    "data.train_split=test",
    "data.limit=256",
    "model.latent_dim=8",
    "model.hidden_dims=[8,16]",
    "trainer.epochs=2",
    "trainer.progress=false",
    "trainer.log_every=2",
    "eval.k=20",  # the final evaluation: 20 importance samples per image (default 1000)
]


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    """The config `python -m vae_exp <overrides>` would run with (Hydra's compose API)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [], return_hydra_config=False)


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a CLI subprocess: this checkout on the path, no W&B settings of
    the caller's (plus `env`)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**full_env, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", **(env or {})}


def run_cli(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: int = 300,
    module: str = "vae_exp",
):
    """Run `python -m MODULE ARGS` (default: vae_exp) in a subprocess from `cwd`; returns the
    CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"the real MNIST test split is missing from {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        message = (
            f"Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist ({FASHION_DIR})"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return FASHION_DIR


@pytest.fixture(scope="session")
def sweep_2x2(tmp_path_factory, mnist_root) -> Path:
    """A real 2x2 sweep (model.latent_dim=4,8 x loss.w=1e-4,1e-3; 2 epochs each) with offline
    W&B runs, made once for the tests that read it."""
    tmp = tmp_path_factory.mktemp("sweep_2x2")
    sweep = tmp / "sweep"
    result = run_cli(
        [
            "--multirun",
            *TINY,
            "model.latent_dim=4,8",
            "loss.w=1e-4,1e-3",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp,
        env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep
