"""Hyperparameter search with Optuna and the parallel / cluster launchers, for real."""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, run_cli

QUICK = [*TINY, "data.limit=128", "trainer.epochs=1", "logger=none"]
SEARCH = [a for a in QUICK if not a.startswith("model.latent_dim")]  # a searched key


def best_val_loss(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return min(m["val/loss"] for m in map(json.loads, lines) if "epoch" in m)


def test_optuna_search(mnist_root, tmp_path):
    sweep = tmp_path / "search"
    result = run_cli(
        ["hparams_search=optuna", "hydra.sweeper.n_trials=3", *SEARCH, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(trials) == 3
    assert results["best_value"] == pytest.approx(min(best_val_loss(t) for t in trials))
    assert set(results["best_params"]) == {"model.latent_dim", "loss.w", "optim.optimizer.lr"}


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers(launcher, mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "--multirun",
            f"launcher={launcher}",
            *QUICK,
            "model.latent_dim=4,8",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    for job in jobs:
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        assert config["model"]["latent_dim"] == (4 if job == "0" else 8)
        assert best_val_loss(sweep / job) > 0


def test_failed_jobs_get_one_paragraph_each_and_a_summary(mnist_root, tmp_path):
    # 2**6 does not divide the 32-pixel images: jobs 0 and 2 fail before training, job 1 runs.
    bad, good, worse = "[8,16,32,64,128,256]", "[8,16]", "[8,16,32,64,128,256,512]"
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "--multirun",
            *[a for a in QUICK if not a.startswith("model.hidden_dims")],
            f"model.hidden_dims={bad},{good},{worse}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    assert output.count("Invalid config for model: data.image_size=32 is not divisible") == 2
    summary = (
        f"2 of 3 sweep jobs failed: job 0 (model.hidden_dims={bad}); "
        f"job 2 (model.hidden_dims={worse}). Each job's error is above and in its vae_exp.log "
        f"under {sweep}."
    )
    assert summary in output.splitlines(), output[-3000:]
    assert best_val_loss(sweep / "1") > 0  # the job after a failed one ran
    assert not (sweep / "0" / "metrics.jsonl").exists()
