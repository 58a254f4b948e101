"""The fast paths train the same model as the plain one, and multi-process training (DDP) works:
bf16 + channels_last, torch.compile and fused Adam on this CPU, DDP with 2 processes and gloo.
The CUDA graph path needs a GPU (tests/test_gpu.py, run there by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from tests import wandb_records
from tests.conftest import TINY, cli_env, run_cli
from tests.test_cli import read_metrics
from vae_exp.data import TensorBatches


@pytest.fixture(scope="module")
def plain_run(mnist_root, tmp_path_factory) -> list[dict]:
    """The plain eager fp32 run (TINY: 2 epochs) the fast paths are compared with."""
    tmp = tmp_path_factory.mktemp("plain")
    result = run_cli([*TINY, "logger=none", f"hydra.run.dir={tmp / 'run'}"], cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(tmp / "run")


@pytest.mark.parametrize(
    "extra",
    [
        ["trainer.precision=bf16", "trainer.channels_last=true"],
        ["trainer.compile=default"],  # inductor on CPU: compiling takes about a minute here
        ["optim.optimizer.fused=true"],
    ],
    ids=["bf16-channels_last", "compile", "fused-adam"],
)
def test_fast_path_trains_the_same_model(extra, plain_run, tmp_path):
    """Same seed, same data: losses within 2% of the plain path's after every epoch."""
    run_dir = tmp_path / "run"
    result = run_cli([*TINY, "logger=none", *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    fast = read_metrics(run_dir)
    assert len(fast) == len(plain_run) == 2
    for plain, quick in zip(plain_run, fast, strict=True):
        for key in ("train/loss", "val/loss", "val/recon"):
            assert quick[key] == pytest.approx(plain[key], rel=0.02), key
    assert fast[-1]["train/loss"] < fast[0]["train/loss"]
    output = result.stdout + result.stderr
    assert ("torch.compile(default)" in output) == ("trainer.compile=default" in extra)
    fused = "optim.optimizer.fused=true" in extra
    assert ("fused Adam" in output) == fused
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert saved["optimizer"]["param_groups"][0]["fused"] is (True if fused else None)


def test_cuda_graph_required_without_cuda_is_a_config_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_dir = tmp_path / "run"
    result = run_cli(
        [*TINY, "logger=none", "trainer.cuda_graph=true", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "trainer.cuda_graph=true" in output and "not CUDA" in output
    assert "allowed: auto" in output and "Traceback" not in output
    assert not (run_dir / "checkpoints").exists()


def test_shards_split_every_pass_evenly():
    images = torch.arange(105, dtype=torch.uint8)[:, None, None, None]
    labels = torch.arange(105)
    seen = {}
    for shuffle in (True, False):
        parts = []
        for rank in range(2):
            gen = torch.Generator().manual_seed(5)  # every process seeds its generator alike
            batches = TensorBatches(images, labels, 10, shuffle, (0.0, 1.0), gen)
            batches.shard(rank, 2)
            part = torch.cat([y for _, y in batches])
            assert len(batches) == len(list(batches.iterate()))
            parts.append(part)
        together = torch.cat(parts)
        assert len(set(together.tolist())) == len(together)  # disjoint
        seen[shuffle] = parts
    # training: equal shares (52 each, one image dropped), so every process takes 6 steps
    assert [len(p) for p in seen[True]] == [52, 52]
    # validation: every image once
    assert sorted(torch.cat(seen[False]).tolist()) == list(range(105))


def test_torchrun_two_processes_ddp(mnist_root, tmp_path):
    """`torchrun --nproc_per_node=2 -m vae_exp`: gloo on CPU; each process trains on half of
    every epoch; metrics are all-reduced; only rank 0 writes files and logs to W&B."""
    env = cli_env({"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    args = [*TINY, "trainer.log_every=1"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "vae_exp"]
        + args,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # rank 0 wrote one run directory; rank 1 nothing (no second run dir, no files in cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
    [run_dir] = list(tmp_path.glob("outputs/*/*"))
    log = (run_dir / "vae_exp.log").read_text()
    assert "rank 0 of 2" in log and "DDP x2" in log
    metrics = read_metrics(run_dir)
    # 256 images, 128 per process, batch 64: 2 steps per epoch in each process
    assert [m["step"] for m in metrics] == [2, 4]
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"]

    [run_file] = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    records = wandb_records.read_records(run_file)
    assert wandb_records.exit_code(records) == 0
    steps = [r["step"] for r in wandb_records.history(records) if "train/loss" in r]
    assert steps == [1, 2, 3, 4]

    # the all-reduced validation loss is the loss over all 256 images: a single process
    # validating the saved weights agrees (the posterior noise differs: 1%)
    from tests.conftest import compose_cfg
    from vae_exp.build import build_experiment
    from vae_exp.distributed import Cluster
    from vae_exp.train import validate

    exp = build_experiment(compose_cfg(TINY), Cluster(), torch.device("cpu"))
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    exp.model.load_state_dict(state["model"])
    val = validate(exp)
    assert val["loss"] == pytest.approx(metrics[-1]["val/loss"], rel=0.01)


def torchrun(args: list[str], cwd, log_path, **popen) -> subprocess.Popen:
    env = cli_env({"OMP_NUM_THREADS": "1"})
    log = open(log_path, "w")  # noqa: SIM115 (closed by the caller's process lifetime)
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "vae_exp"]
        + args,
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        **popen,
    )


def test_sigterm_to_torchrun_stops_every_process_together(mnist_root, tmp_path):
    """SIGTERM to torchrun mid-epoch (it forwards it to both processes): they agree at the
    next log point, rank 0 checkpoints that step, nothing hangs; a torchrun resume finishes."""
    import re
    import time

    from vae_exp.checkpoint import load_checkpoint

    args = [a for a in TINY if not a.startswith(("data.limit", "trainer."))] + [
        "data.limit=2048",
        "data.batch_size=4",  # 1024 images per process: 256 steps an epoch
        "trainer.epochs=2",
        "trainer.log_every=1",
        "logger=none",
        "eval.enabled=false",
    ]
    run_dir = tmp_path / "run"
    log_path = tmp_path / "stopped.log"
    proc = torchrun([*args, f"hydra.run.dir={run_dir}"], tmp_path, log_path)
    deadline = time.time() + 240
    while not re.search(r"Epoch 2/2: +\d+%\|[^\n\r]*\| [1-9]\d*/256", log_path.read_text()):
        assert time.time() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)  # no deadlock
    output = log_path.read_text()
    assert "Stopped by SIGTERM in epoch 2" in output, output[-3000:]
    position = load_checkpoint(run_dir / "checkpoints" / "last.pt")["position"]
    assert position["epoch"] == 1 and 0 < position["batches_done"] < 256
    assert position["step"] == 256 + position["batches_done"]

    resumed = torchrun(
        [*args, f"trainer.resume={run_dir}", f"hydra.run.dir={tmp_path / 'resumed'}"],
        tmp_path,
        tmp_path / "resumed.log",
    )
    assert resumed.wait(timeout=240) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    metrics = read_metrics(tmp_path / "resumed")
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[-1]["step"] == 512
