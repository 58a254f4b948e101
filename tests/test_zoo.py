"""Every model and loss of the zoo trains on real data through the CLI, the final evaluation
lands where it should, and `python -m vae_exp.evaluate` reproduces it from a checkpoint."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY, run_cli
from tests.test_cli import read_metrics

BASE = [a for a in TINY if not a.startswith("model.")]
SMALL_CONV = ["model.latent_dim=8", "model.hidden_dims=[8,16]"]
BCE = ["loss=bce_kld", "data.binarize=dynamic"]

VARIANTS = {
    "mlp_vae": ["model=mlp_vae", "model.hidden_dim=64", "data.image_size=28", *BCE],
    "conditional": ["model=conditional_conv_vae", *SMALL_CONV, *BCE],
    "beta_vae": [*SMALL_CONV, "loss=beta_vae"],
    "beta_vae_capacity": [
        *SMALL_CONV,
        "loss=beta_vae_capacity",
        "loss.w=1.0",
        "loss.capacity.steps=8",
        "loss.capacity.max=5",
    ],
    "iwae": [*SMALL_CONV, "loss=iwae", "loss.k=4", "data.binarize=static"],
    "cyclical": [*SMALL_CONV, *BCE, "loss/kl_schedule=cyclical", "loss.kl_schedule.cycle_steps=4"],
    "warmup_free_bits": [
        *SMALL_CONV,
        "loss/kl_schedule=linear",
        "loss.kl_schedule.warmup_steps=6",
        "loss.free_bits=0.1",
    ],
}


def run_variant(name: str, tmp_path: Path, extra: list[str] = ()) -> Path:
    run_dir = tmp_path / name
    args = [*BASE, *VARIANTS[name], "logger=none", "trainer.epochs=3", *extra]
    result = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return run_dir


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_and_is_evaluated(name, mnist_root, tmp_path):
    run_dir = run_variant(name, tmp_path)
    metrics = read_metrics(run_dir)
    losses = [m["train/loss"] for m in metrics]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    for key in ("train/kld", "train/weighted_kld", "train/kl_weight", "val/loss"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    assert all(m["train/kld"] >= 0 for m in metrics)  # the true KL, never negated
    if name == "cyclical":  # 4 steps per epoch = one cycle: its mean weight is 0.5 + ...
        assert [m["train/kl_weight"] for m in metrics] == pytest.approx([0.625] * 3)
    if name == "warmup_free_bits":
        weights = [m["train/kl_weight"] for m in metrics]
        assert weights[0] < weights[-1] == pytest.approx(0.00025)
        assert all(m["train/kld_free_bits"] >= 0.8 - 1e-6 for m in metrics)  # 8 dims x 0.1
    if name == "beta_vae_capacity":
        assert [m["train/capacity"] for m in metrics][-1] == pytest.approx(5.0)

    results = json.loads((run_dir / "eval.json").read_text())
    assert results["images"] == 256 and results["k"] == 20 and results["epoch"] == 3
    assert results["likelihood"] == ("gaussian" if name == "warmup_free_bits" else "bernoulli")
    for key in ("neg_elbo", "recon_nll", "kl", "nll", "mse"):
        assert math.isfinite(results[key]), key
    assert results["neg_elbo"] == pytest.approx(results["recon_nll"] + results["kl"], rel=1e-6)
    assert results["nll"] <= results["neg_elbo"] + 1.0  # IS (k=20) is a tighter bound
    assert 0 <= results["active_units"] <= results["latent_dim"]
    assert len(results["kl_per_dim"]) == results["latent_dim"]
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval/nll"] == pytest.approx(results["nll"])
    for picture in ("samples", "reconstructions", "interpolations"):
        grid = np.asarray(Image.open(run_dir / "eval" / f"{picture}.png"))
        assert grid.std() > 0, picture
    if name == "conditional":  # samples: one row per class (10 rows of 8)
        grid = np.asarray(Image.open(run_dir / "eval" / "samples.png"))
        assert grid.shape[0] == 10 * (32 + 2) + 2


def evaluate_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(args, cwd, module="vae_exp.evaluate")


def test_evaluate_cli_reproduces_the_final_evaluation(mnist_root, tmp_path):
    """The checkpoint of the final epoch, reloaded by the CLI, evaluates to the same numbers
    (same weights, same seeded samples), and a 2-D latent gets its manifold picture."""
    run_dir = run_variant("mlp_vae", tmp_path, ["model.latent_dim=2"])
    at_end = json.loads((run_dir / "eval.json").read_text())
    assert (run_dir / "eval" / "manifold.png").is_file()
    (run_dir / "eval.json").unlink()
    result = evaluate_cli([str(run_dir / "checkpoints" / "last.pt"), "--k", "20"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("-log p(x) (IS, k=20)") == 1
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["weights"] == str(run_dir / "checkpoints" / "last.pt")
    for key in ("neg_elbo", "recon_nll", "kl", "nll", "mse", "active_units", "images"):
        assert again[key] == pytest.approx(at_end[key], rel=1e-6), key
    assert again["kl_per_dim"] == pytest.approx(at_end["kl_per_dim"], rel=1e-6)
    # more samples: a tighter estimate (k=200 >= k=20 in expectation; 256 images)
    result = evaluate_cli([str(run_dir), "--k", "200", "--chunk", "64"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tighter = json.loads((run_dir / "eval.json").read_text())  # more thorough: eval.json
    assert tighter["k"] == 200 and tighter["nll"] < at_end["nll"] + 0.05
    kept = sorted(p.name for p in (run_dir / "eval").glob("*.json"))
    assert kept == ["test-k20-n256-epoch3.json", "test-k200-n256-epoch3.json"]


def test_evaluate_cli_bad_input(tmp_path):
    result = evaluate_cli([str(tmp_path)], tmp_path)
    assert result.returncode == 2
    assert "has no checkpoints/best.pt" in result.stderr and "Traceback" not in result.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = evaluate_cli([str(bad)], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(bad) in result.stderr


def test_schedule_state_survives_resume(mnist_root, tmp_path):
    """A linear warm-up resumed after epoch 1 continues where it was: the same per-epoch KL
    weights and losses as an uninterrupted run."""
    extra = ["loss.kl_schedule.warmup_steps=10", "eval.enabled=false"]
    whole = run_variant("warmup_free_bits", tmp_path, extra)
    part = tmp_path / "part"
    args = [*BASE, *VARIANTS["warmup_free_bits"], "logger=none", *extra]
    first = run_cli([*args, "trainer.epochs=1", f"hydra.run.dir={part}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = tmp_path / "resumed"
    second = run_cli(
        [*args, "trainer.epochs=3", f"trainer.resume={part}", f"hydra.run.dir={resumed}"],
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = read_metrics(whole), read_metrics(resumed)
    assert [m["train/kl_weight"] for m in a] == pytest.approx([m["train/kl_weight"] for m in b])
    assert [m["train/loss"] for m in a] == pytest.approx([m["train/loss"] for m in b], rel=1e-6)
    assert a[0]["train/kl_weight"] < a[-1]["train/kl_weight"]


def test_labels_are_checked_for_a_conditional_model():
    """Every data path's labels are checked once against model.num_classes."""
    import torch
    from torch.utils.data import TensorDataset

    from vae_exp.build import check_labels
    from vae_exp.config import ConfigError
    from vae_exp.data import Data, LoaderBatches, TensorBatches

    images, labels = torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 4, 9])
    resident = TensorBatches(images, labels, 2, False, (0.0, 1.0))
    loader = LoaderBatches(
        TensorDataset(images, labels), 2, False, 0, torch.device("cpu"), (0.0, 1.0)
    )
    for batches in (resident, loader):
        check_labels(Data(train=batches, val=batches), 10)  # fine
        with pytest.raises(ConfigError, match=r"model\.num_classes=5 .* labels 0\.\.9"):
            check_labels(Data(train=batches, val=batches), 5)
