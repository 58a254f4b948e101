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
    (["optim.optimizer.lr=-1e-3"], ["optim.optimizer.lr", "a finite number > 0"]),
    (["optim.optimizer.lr=inf"], ["optim.optimizer.lr=inf", "a finite number > 0"]),
    (["optim.optimizer.weight_decay=inf"], ["optim.optimizer.weight_decay=inf", "finite"]),
    (["eval.sigma=inf"], ["eval.sigma=inf", "implied | a finite number > 0"]),
    (["logger.init_timeout=nan"], ["logger.init_timeout=nan", "a finite number of seconds"]),
    (["trainer.seed=99999999999999999999999"], ["trainer.seed=9999", "an integer in [0, 2**63)"]),
    (["+epochs=50"], ["unknown top-level key epochs", "trainer.epochs", "data, optim, loss"]),
    (["optim.optimizer.fused=maybe"], ["optim.optimizer.fused='maybe'", "true | false | null"]),
    (["trainer.epochs=0"], ["trainer.epochs", "an integer >= 1"]),
    (["+trainer.epoch=3"], ["unknown key trainer.epoch", "epochs"]),
    (["trainer.epoch=3"], ["unknown key trainer.epoch (did you mean trainer.epochs?)", "seed"]),
    (
        ["model.latent_dims=64"],
        ["unknown key model.latent_dims (did you mean model.latent_dim?)", "hidden_dims"],
    ),
    (["data.val_batch_size=0"], ["data.val_batch_size=0", "auto (1024 on CUDA, 64 elsewhere)"]),
    (["eval.batch_size=big"], ["eval.batch_size='big'", "auto (1024 on CUDA, 64 elsewhere)"]),
    (["data.train_split=valid"], ["data.train_split", "train | test"]),
    (["data.batch_size=0"], ["data.batch_size=0", "an integer >= 1"]),
    (["data.channels=2"], ["data.channels=2", "1 (grey) or 3 (RGB)"]),
    (["+data.val_fraction=0.1"], ["data.val_fraction", "data=folder only"]),
    (["model.hidden_dims=8"], ["model.hidden_dims=8", "list of integers"]),
    (["model.in_channels=3"], ["model.in_channels=3", "data.channels=1"]),
    (["loss.w=abc"], ["loss.w='abc'", "a number >= 0"]),
    (["+optim.momentum=0.9"], ["unknown key optim.momentum", "optim.optimizer"]),
    (["+optim.optimizer.foo=1"], ["unknown key optim.optimizer.foo", "betas"]),
    (["+model.foo=1"], ["unknown key model.foo", "latent_dim, hidden_dims"]),
    (["+loss.beta=2"], ["unknown key loss.beta", "are w, kl_schedule, free_bits, capacity."]),
    (["optim/scheduler=step", "optim.scheduler.step_size=0"], ["optim.scheduler", "ZeroDivision"]),
    (["optim/scheduler=warmup"], ["Could not find 'optim/scheduler/warmup'", "cosine"]),
    (["logger.mode=sometimes"], ["logger.mode='sometimes'", "auto | online | offline"]),
    (["+logger.colour=red"], ["unknown key logger.colour"]),
    (["trainer.device=tpu"], ["trainer.device='tpu'", "auto | cpu | cuda"]),
    (["trainer.precision=fp16"], ["trainer.precision='fp16'", "fp32 | bf16"]),
    (["data=folder", "data.root=/nonexistent/images"], ["/nonexistent/images is not a directory"]),
    (["trainer.compile=yes"], ["trainer.compile='yes'", "false | default | reduce-overhead"]),
    (["trainer.cuda_graph=maybe"], ["trainer.cuda_graph='maybe'", "auto | true | false"]),
    (["data.binarize=maybe"], ["data.binarize='maybe'", "none | dynamic | static"]),
    (["loss/kl_schedule=linear", "loss.kl_schedule.warmup_steps=0"], ["warmup_steps=0"]),
    (["loss.free_bits=-1"], ["loss.free_bits=-1", "a number >= 0"]),
    (["loss=iwae", "loss.k=0"], ["loss.k=0", "an integer >= 1"]),
    (["eval.k=0"], ["eval.k=0", "an integer >= 1"]),
    (["eval.k=many"], ["eval.k='many'", "allowed: auto (1000 on CUDA, 10 otherwise) | an integer"]),
    (["+eval.samples=5"], ["unknown key eval.samples", "chunk"]),
    (["model=conditional_conv_vae", "model.num_classes=0"], ["model.num_classes=0", ">= 1"]),
    (["data.batch_size=1"], ["data.batch_size=1", "BatchNorm", "data.batch_size >= 2"]),
    (["data.limit=1"], ["data.limit=1", "BatchNorm", "data.limit >= 2"]),
    (
        ["data=fashion_mnist", "data.root=/nonexistent/dir", "data.download=false"],
        ["data.root=/nonexistent/dir is not a directory", "or null"],
    ),
    (["data=folder", "data.root=null"], ["data.root=None", "a folder path"]),
    # Burda et al.'s experiments (tests/test_burda.py)
    (["experiment=burda_vae", "model.hidden_dims=[]"], ["model.hidden_dims=[]", "non-empty"]),
    (
        ["experiment=burda_vae", "model.hidden_dim=200"],
        ["model.hidden_dim=200 and model.hidden_dims=[8, 16]", "set model.hidden_dim=null"],
    ),
    (["model=mlp_vae", "model.hidden_dims=[200,200]"], ["are both set", "hidden_dim=500"]),
    (["experiment=burda_vae", "loss.bound=mean"], ["loss.bound='mean'", "iwae | elbo"]),
    (
        ["experiment=burda_vae", "optim.scheduler.epochs=100"],
        ["optim.scheduler.epochs=100", "the sum of stage_epochs, 3280"],
    ),
    (
        ["experiment=burda_vae", "optim.scheduler.stage_epochs=[1,0]"],
        ["optim.scheduler.stage_epochs=[1, 0]", "integers >= 1"],
    ),
    (["experiment=burda"], ["Could not find 'experiment/burda'", "burda_vae", "burda_iwae"]),
]
if not torch.cuda.is_available():
    CASES.append(
        (
            ["trainer.device=cuda"],
            ["trainer.device", "CUDA is not available", "allowed: auto | cpu"],
        )
    )


@pytest.mark.parametrize(("overrides", "expected"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_config_fails_before_training(overrides, expected, tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, *overrides, f"hydra.run.dir={run_dir}"]  # logger=wandb, W&B off if reached
    result = run_cli(args, cwd=tmp_path, env={"WANDB_MODE": "disabled"})
    output = result.stdout + result.stderr
    # 1: Hydra's own errors (unknown option, override of a key that does not exist); 2: ours
    assert result.returncode == (1 if expected[0].startswith("Could not") else 2), output[-2000:]
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
