"""Bad input: a clear one-paragraph error naming the key, a non-zero exit, nothing trained."""

import pytest
import torch

from tests.conftest import TINY, run_cli

CASES = [
    (["model=resnet"], ["Could not find 'model/resnet'", "conv_vae"]),
    (["data=imagenet"], ["Could not find 'data/imagenet'", "fashion_mnist"]),
    (["model.latent_dim=0"], ["model.latent_dim", ">= 1"]),
    (["model.hidden_dims=[]"], ["model.hidden_dims", "non-empty"]),
    (["model.latent_dim=abc"], ["model.latent_dim", "an integer >= 1"]),
    (["data.image_size=30"], ["data.image_size=30", "2**len(model.hidden_dims)"]),
    (["loss.w=-0.1"], ["loss.w", ">= 0"]),
    (["optim.optimizer.lr=-1e-3"], ["optim.optimizer.lr", "a number > 0"]),
    (["trainer.epochs=0"], ["trainer.epochs", "an integer >= 1"]),
    (["+trainer.epoch=3"], ["unknown key trainer.epoch", "epochs"]),
    (["trainer.epoch=3"], ["Could not override 'trainer.epoch'"]),
    (["data.train_split=valid"], ["data.train_split", "train | test"]),
]
if not torch.cuda.is_available():
    CASES.append((["trainer.device=cuda"], ["trainer.device", "CUDA is not available"]))


@pytest.mark.parametrize(("overrides", "expected"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_config_fails_before_training(overrides, expected, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*TINY, "logger=none", *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for text in expected:
        assert text in output, output[-2000:]
    assert "Traceback" not in output
    assert not (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "checkpoints").exists()


def test_missing_data_names_the_paths_and_the_fix(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            *TINY,
            "logger=none",
            f"data.root={empty}",
            "data.train_split=train",
            "data.download=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "the train split was not found" in output
    assert str(empty / "MNIST" / "raw") in output and "data.download=true" in output
    assert "Traceback" not in output
    assert not (run_dir / "metrics.jsonl").exists()
