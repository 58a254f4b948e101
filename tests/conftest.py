"""Shared fixtures: paths to the real data, Hydra composition, and running the CLI."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from vae_exp.config import one_line

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist

# Real MNIST, both splits (the tests train on the train split and validate and evaluate on the
# test split, as the original script): $VAE_EXP_DATA when set, else ../shared/data, else
# torchvision's download into a cache folder (tried once per session), else tests skip.
DATA_ENV = "VAE_EXP_DATA"
MNIST_TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
MNIST_TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_FILES = (*MNIST_TRAIN_FILES, *MNIST_TEST_FILES)
DOWNLOAD_HOST = "ossci-datasets.s3.amazonaws.com"  # torchvision's first MNIST mirror


def has_mnist(root: Path) -> bool:
    """Whether root holds both of MNIST's splits as torchvision stores them (MNIST/raw/*.gz)."""
    return all((root / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES)


def mnist_places(env: Mapping[str, str], repo: Path) -> list[Path]:
    """Where the tests look for MNIST, in order: only $VAE_EXP_DATA when it is set (a folder
    holding MNIST/raw/...); else ../shared/data beside the checkout, then the download cache
    (the last place, where a download goes)."""
    if env.get(DATA_ENV):
        return [Path(env[DATA_ENV]).expanduser().absolute()]
    cache = Path(env.get("XDG_CACHE_HOME") or Path(env.get("HOME", "~"), ".cache"))
    return [repo.parent / "shared" / "data", cache.expanduser() / "vae_exp" / "data"]


def find_mnist(env: Mapping[str, str], repo: Path) -> Path:
    """The first place of `mnist_places` that holds MNIST, else the last one."""
    places = mnist_places(env, repo)
    return next((p for p in places if has_mnist(p)), places[-1])


def missing_mnist_reason(env: Mapping[str, str], repo: Path, download_error: str) -> str:
    """Why MNIST-reading tests skip, and how to give them the data."""
    where = ", ".join(str(p) for p in mnist_places(env, repo))
    return (
        f"real MNIST (MNIST/raw/{', '.join(MNIST_FILES)}) was not found in "
        f"{where}{download_error}. To run these tests, set {DATA_ENV} to a folder holding "
        "MNIST/raw/ with those files (README, Set up)"
    )


@functools.cache
def download_mnist(root: Path) -> str:
    """Download MNIST into root with torchvision, once per session; "" or why it failed. A
    quick connection test first, so that no network costs seconds, not minutes. torchvision
    fetches both splits whichever one is asked for."""
    try:
        socket.create_connection((DOWNLOAD_HOST, 443), timeout=5).close()
        from torchvision import datasets

        datasets.MNIST(str(root), train=False, download=True)
    except Exception as e:  # no network comes in many types
        return f"; downloading it into {root} failed ({one_line(e)})"
    return ""


DATA_ROOT = find_mnist(os.environ, REPO)
SHARED_DATA = DATA_ROOT  # the real MNIST (60,000 train + 10,000 test images), found as above

# A small model and a few real images: enough to exercise every path in seconds on a CPU. As the
# original script: the train split trains (its first 256 images), the test split validates
# (its first 256) and the final evaluation reads the test split (eval.limit follows data.limit).
TINY = [
    f"data.root={SHARED_DATA}",
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
    """The folder holding real MNIST (`find_mnist`); tests that need it skip without it."""
    if not has_mnist(DATA_ROOT):
        error = "" if os.environ.get(DATA_ENV) else download_mnist(DATA_ROOT)
        if error or not has_mnist(DATA_ROOT):
            pytest.skip(missing_mnist_reason(os.environ, REPO, error))
    return DATA_ROOT


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
    closing = f"Sweep finished: 4 jobs in {sweep}. Compare them with: python -m vae_exp.compare"
    assert closing in result.stdout
    return sweep
