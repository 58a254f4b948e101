"""Runs that survive: resume, preemption, atomic checkpoints, NaNs and W&B outages."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests import wandb_records
from tests.conftest import TINY, cli_env, run_cli
from vae_exp.checkpoint import (
    FORMAT_VERSION,
    CheckpointWriter,
    load_checkpoint,
    save_checkpoint,
    snapshot,
)

LONG = [  # 512 steps an epoch (about 2 s): room to signal a run in the middle of an epoch;
    # an LR schedule, so resuming must restore it too
    a
    for a in TINY
    if not a.startswith(("data.limit", "trainer.epochs", "trainer.progress"))
] + [
    "data.limit=2048",
    "data.batch_size=4",
    "trainer.epochs=3",
    "trainer.log_every=64",
    "optim/scheduler=step",
    "optim.scheduler.step_size=1",
    "optim.scheduler.gamma=0.5",
]


def metrics(run_dir: Path) -> list[dict]:
    """The per-epoch lines of metrics.jsonl (not the final eval/* line)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "epoch" in m]


def same_losses(a: list[dict], b: list[dict]) -> None:
    assert [m["epoch"] for m in a] == [m["epoch"] for m in b]
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b, strict=True):
        for key in ("train/loss", "train/kld", "val/loss", "val/recon", "val/kld"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), key


def wandb_run(run_dir: Path) -> tuple[str, int | None]:
    [path] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records.read_records(path)
    return wandb_records.run_info(records).run_id, wandb_records.exit_code(records)


FOLDER = [
    "data=folder",
    "data.channels=1",
    "data.image_size=32",
    "data.num_workers=1",
]


@pytest.mark.parametrize("source", ["device", "folder"])
def test_resume_after_epoch_one_matches_an_uninterrupted_run(source, mnist_root, tmp_path):
    env = {"WANDB_MODE": "offline"}
    args = [*TINY, "trainer.epochs=3"]
    if source == "folder":  # DataLoader workers: their seeds must not shift training's RNG
        from tests.test_data import write_pngs
        from vae_exp.data import load_idx_split

        images, labels = load_idx_split("mnist", mnist_root, "test", download=False)
        write_pngs(tmp_path / "digits" / "train", images[:96], labels[:96])
        write_pngs(tmp_path / "digits" / "test", images[96:128], labels[96:128])
        args += [*FOLDER, f"data.root={tmp_path / 'digits'}"]
    full = run_cli([*args, f"hydra.run.dir={tmp_path / 'full'}"], cwd=tmp_path, env=env)
    assert full.returncode == 0, full.stderr[-2000:]
    first = run_cli(
        [*args, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'first'}"], cwd=tmp_path, env=env
    )
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_cli(
        [*args, f"trainer.resume={tmp_path / 'first'}", f"hydra.run.dir={tmp_path / 'resumed'}"],
        cwd=tmp_path,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    same_losses(metrics(tmp_path / "full"), metrics(tmp_path / "resumed"))
    assert (tmp_path / "resumed" / "checkpoints" / "best.pt").is_file()
    # the same W&B run goes on
    assert wandb_run(tmp_path / "first")[0] == wandb_run(tmp_path / "resumed")[0]
    assert wandb_run(tmp_path / "first")[0] != wandb_run(tmp_path / "full")[0]


def test_resume_auto_and_a_checkpoint_of_another_experiment(mnist_root, tmp_path):
    base = [*TINY, "logger=none"]
    for name, latent in (("a", 8), ("b", 4)):  # b is newer but another experiment
        result = run_cli(
            [
                *base,
                "trainer.epochs=1",
                f"model.latent_dim={latent}",
                f"hydra.run.dir=outputs/{name}",
            ],
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    auto = run_cli([*base, "trainer.resume=auto", "hydra.run.dir=outputs/c"], cwd=tmp_path)
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert f"resuming {tmp_path / 'outputs' / 'a'}" in auto.stdout + auto.stderr
    assert [m["epoch"] for m in metrics(tmp_path / "outputs" / "c")] == [1, 2]

    wrong = run_cli(
        [
            *base,
            "model.latent_dim=16",
            f"trainer.resume={tmp_path / 'outputs/a'}",
            "hydra.run.dir=outputs/d",
        ],
        cwd=tmp_path,
    )
    output = wrong.stdout + wrong.stderr
    assert wrong.returncode == 2
    assert "made for another experiment" in output and "model.latent_dim: 8 -> 16" in output
    missing = run_cli([*base, "trainer.resume=nowhere", "hydra.run.dir=outputs/e"], cwd=tmp_path)
    assert missing.returncode == 2 and "trainer.resume='nowhere'" in missing.stdout
    done = run_cli(
        [
            *base,
            "trainer.epochs=1",
            f"trainer.resume={tmp_path / 'outputs/a'}",
            "hydra.run.dir=outputs/f",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "has already trained 1 epochs" in done.stdout

    # auto: the newest run of this config (c) is finished, so a fresh run starts ...
    fresh = run_cli([*base, "trainer.resume=auto", "hydra.run.dir=outputs/g"], cwd=tmp_path)
    assert "no unfinished run of this experiment" in fresh.stdout
    # ... and a requeued job takes its own checkpoint before any newer one
    again = run_cli(
        [*base, "trainer.epochs=3", "trainer.resume=auto", "hydra.run.dir=outputs/a"], cwd=tmp_path
    )
    assert f"resuming {tmp_path / 'outputs' / 'a' / 'checkpoints'}" in again.stdout

    last = tmp_path / "outputs" / "a" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    broken = run_cli(
        [*base, "trainer.epochs=5", f"trainer.resume={last}", "hydra.run.dir=outputs/h"],
        cwd=tmp_path,
    )
    assert broken.returncode == 2 and "is unreadable (truncated or corrupt?)" in broken.stdout
    assert "Traceback" not in broken.stdout + broken.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_checkpoints_the_step_and_resume_loses_nothing(
    sig, mnist_root, tmp_path
):
    env = {"WANDB_MODE": "offline"}
    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vae_exp", *LONG, f"hydra.run.dir={tmp_path / 'stopped'}"],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=cli_env({"WANDB_MODE": "offline"}),
        )
        # wait for the progress bar to show epoch 2 under way, then signal
        deadline = time.time() + 300
        while not re.search(r"Epoch 2/3: +\d+%\|[^\n\r]*\| [1-9]\d*/512", log_path.read_text()):
            assert time.time() < deadline and proc.poll() is None, log_path.read_text()[-2000:]
            time.sleep(0.02)
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    output = log_path.read_text()
    assert code == 128 + sig, output[-2000:]
    assert f"Stopped by {sig.name}" in output and "Traceback" not in output
    state = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    position = state["position"]
    assert position["epoch"] == 1 and 0 < position["batches_done"] < 512  # mid-epoch
    assert position["step"] == 512 + position["batches_done"]
    run_id, exit_code = wandb_run(tmp_path / "stopped")
    assert exit_code == 128 + sig  # the W&B run is marked as failed ...
    [path] = (tmp_path / "stopped").glob("wandb/offline-run-*/run-*.wandb")
    kinds = [r.WhichOneof("record_type") for r in wandb_records.read_records(path)]
    assert "preempting" in kinds  # ... and as preempted

    if sig != signal.SIGTERM:
        return  # one signal is enough for the (slower) comparison with an uninterrupted run
    full = run_cli([*LONG, f"hydra.run.dir={tmp_path / 'full'}"], cwd=tmp_path, env=env)
    assert full.returncode == 0, full.stderr[-2000:]
    resumed = run_cli(
        [*LONG, f"trainer.resume={tmp_path / 'stopped'}", f"hydra.run.dir={tmp_path / 'resumed'}"],
        cwd=tmp_path,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    same_losses(metrics(tmp_path / "full"), metrics(tmp_path / "resumed"))
    assert wandb_run(tmp_path / "resumed")[0] == run_id


def test_an_exploding_learning_rate_stops_with_the_step_and_keeps_the_good_checkpoint(
    mnist_root, tmp_path
):
    run_dir = tmp_path / "run"
    # epoch 1 at lr 5e-4, then the step schedule multiplies it by 1e8: the loss blows up
    args = [
        *TINY,
        "logger=none",
        "trainer.epochs=3",
        "optim/scheduler=step",
        "optim.scheduler.step_size=1",
        "optim.scheduler.gamma=1e8",
    ]
    result = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 3
    assert "Non-finite loss or gradient at step" in output and "loss=" in output
    assert "The last good checkpoint is kept" in output and "Traceback" not in output
    step = int(output.split("Non-finite loss or gradient at step ")[1].split(":")[0])
    assert step > 4  # epoch 1 (4 steps) was fine
    assert [m["epoch"] for m in metrics(run_dir)] == [1]
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    skipping = run_cli(
        [*args, "trainer.skip_nonfinite=2", f"hydra.run.dir={tmp_path / 's'}"], cwd=tmp_path
    )
    output = skipping.stdout + skipping.stderr
    assert skipping.returncode == 3
    assert output.count("skipped non-finite step") == 3  # two allowed, the third stops it
    assert "trainer.skip_nonfinite (now 2)" in output


def test_checkpoints_are_atomic_and_verified(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    good = path.read_bytes()
    with pytest.raises(TypeError, match="pickle"):  # torch.save cannot write a lock: the
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "bad": threading.Lock()})
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary files left
    state = torch.load(path, weights_only=True)
    assert state["format_version"] == FORMAT_VERSION and state["epoch"] == 1

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated.pt is unreadable"):
        load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save({"format_version": 99}, other)
    with pytest.raises(ValueError, match="other.pt has format_version 99"):
        load_checkpoint(other)


def test_wandb_unreachable_falls_back_to_offline(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            *TINY,
            "trainer.epochs=1",
            "logger.mode=online",
            "logger.init_timeout=3",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env={
            "WANDB_BASE_URL": "http://127.0.0.1:9",
            "WANDB_API_KEY": "a" * 40,
            "HOME": str(tmp_path),
        },
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "could not start online" in output and "wandb sync" in output
    run_id, exit_code = wandb_run(run_dir)
    assert exit_code == 0 and len(metrics(run_dir)) == 1


def submitit_job_pids(folder: Path) -> list[int]:
    """PIDs of the submitit job processes whose job folder lies under `folder`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in cmdline and str(folder) in cmdline:
            pids.append(int(proc.name))
    return pids


def test_preempted_submitit_job_is_requeued_and_resumes(mnist_root, tmp_path):
    """launcher=submitit_local: SIGUSR2 (what SLURM sends via submitit before a preemption)
    mid-epoch; the job checkpoints its step, submitit requeues it, and it resumes to the same
    losses as an uninterrupted run."""
    full = run_cli([*LONG, "logger=none", f"hydra.run.dir={tmp_path / 'full'}"], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    sweep = tmp_path / "sweep"
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vae_exp",
                "--multirun",
                "launcher=submitit_local",
                *LONG,
                "logger=none",
                f"hydra.sweep.dir={sweep}",
            ],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=cli_env(),
        )
        job_log = sweep / "0" / "vae_exp.log"

        def progress() -> str:  # the job's stderr, where its progress bar goes
            return "".join(p.read_text() for p in sweep.glob(".submitit/*/*_0_log.err"))

        deadline = time.time() + 300
        while not re.search(r"Epoch 2/3: +\d+%\|[^\n\r]*\| [1-9]\d*/512", progress()):
            assert time.time() < deadline and proc.poll() is None, progress()[-2000:]
            time.sleep(0.02)
        [pid] = submitit_job_pids(sweep)
        os.kill(pid, signal.SIGUSR2)
        assert proc.wait(timeout=300) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    resumed = re.search(r"epoch 1 done, (\d+) batches into the next", job_log.read_text())
    assert resumed and int(resumed.group(1)) > 0  # resumed in the middle of epoch 2
    same_losses(metrics(tmp_path / "full"), metrics(sweep / "0"))


def test_a_failing_job_does_not_stop_the_sweep(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "--multirun",
            *TINY,
            "logger=none",
            "trainer.epochs=3",
            "optim/scheduler=step",
            "optim.scheduler.step_size=1",
            "optim.scheduler.gamma=1e8,0.5",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode != 0  # the sweep reports its failed job ...
    assert "Non-finite loss or gradient" in (sweep / "0" / "vae_exp.log").read_text()
    assert [m["epoch"] for m in metrics(sweep / "1")] == [1, 2, 3]  # ... after running the rest


def test_a_corrupted_checkpoint_is_detected(tmp_path):
    path = tmp_path / "last.pt"
    weights = torch.linspace(-1, 1, 4096)
    save_checkpoint(path, {"model": {"w": weights}, "epoch": 1})
    data = bytearray(path.read_bytes())
    offset = bytes(data).find(weights.numpy().tobytes()[:64])
    assert offset > 0
    data[offset + 100] ^= 0x01  # one flipped bit inside the tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="last.pt is corrupt: its checksum does not match"):
        load_checkpoint(path)
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # readable by others (umask)


def test_checkpoints_from_before_new_keys_still_resume():
    """A config saved before data.binarize / KL schedules existed matches today's defaults,
    but not a run that turns the new options on. Fused Adam (an implementation choice, same
    update) may be switched on or off when resuming."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_cfg
    from vae_exp.checkpoint import config_differences

    current = OmegaConf.to_container(compose_cfg(TINY), resolve=True)
    old = OmegaConf.to_container(compose_cfg(TINY), resolve=True)
    del old["data"]["binarize"], old["loss"]["kl_schedule"], old["loss"]["free_bits"]
    del old["loss"]["capacity"], old["eval"], old["trainer"]["cuda_graph"]
    del old["optim"]["optimizer"]["fused"]
    assert config_differences(old, current) == []
    fused = compose_cfg([*TINY, "optim.optimizer.fused=true"])
    assert config_differences(old, OmegaConf.to_container(fused, resolve=True)) == []
    changed = OmegaConf.to_container(
        compose_cfg([*TINY, "data.binarize=dynamic", "loss/kl_schedule=linear"]), resolve=True
    )
    differences = config_differences(old, changed)
    assert any(d.startswith("data.binarize: '<absent>' -> 'dynamic'") for d in differences)
    assert any(d.startswith("loss.kl_schedule.kind") for d in differences)


def test_the_background_writer_links_best_to_last_and_keeps_it(tmp_path):
    """best.pt equal to the new last.pt is a hard link (no second write); the next last.pt
    (an atomic rename) leaves best.pt on the old file; a failed write raises at wait()."""
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    writer = CheckpointWriter()
    weights = torch.arange(4.0)
    state = snapshot({"model": {"w": weights}, "epoch": 1})
    weights += 100  # training goes on: the snapshot must not see it
    writer.submit(state, last, best)
    writer.wait()
    assert os.stat(last).st_ino == os.stat(best).st_ino and os.stat(best).st_nlink == 2
    assert load_checkpoint(best)["model"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    writer.submit(snapshot({"model": {"w": weights}, "epoch": 2}), last, None)
    writer.wait()
    assert load_checkpoint(last)["epoch"] == 2 and load_checkpoint(best)["epoch"] == 1
    assert os.stat(best).st_nlink == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    writer.submit({"bad": threading.Lock()}, last, None)  # cannot be pickled
    with pytest.raises(TypeError, match="pickle"):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # training's check at its log points: no waiting
            writer.check()
            time.sleep(0.01)
    assert load_checkpoint(last)["epoch"] == 2  # the failed write replaced nothing
    writer.wait()  # the error was raised once
    assert writer.written == last  # the last write that completed


def test_a_snapshot_is_a_state_dict_like_the_original():
    """OrderedDicts stay OrderedDicts, with the module versions load_state_dict reads."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    original = model.state_dict()
    copied = snapshot({"model": original})["model"]
    assert type(copied) is type(original) and list(copied) == list(original)
    assert copied._metadata == original._metadata
    assert all(copied[k] is not original[k] and torch.equal(copied[k], original[k]) for k in copied)


def test_resuming_takes_todays_fused_setting(mnist_root, tmp_path):
    """A checkpoint of the default (unfused on a CPU) Adam resumes with fused Adam when the
    resumed run asks for it (optim.optimizer.fused may change on resume)."""
    first = tmp_path / "first"
    args = [*TINY, "trainer.epochs=1", "logger=none", "eval.enabled=false"]
    assert run_cli([*args, f"hydra.run.dir={first}"], cwd=tmp_path).returncode == 0
    saved = torch.load(first / "checkpoints" / "last.pt", weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["fused"] is None
    resumed = run_cli(
        [
            *args,
            "trainer.epochs=2",
            "optim.optimizer.fused=true",
            f"trainer.resume={first}",
            f"hydra.run.dir={tmp_path / 'resumed'}",
        ],
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "fused Adam" in resumed.stdout + resumed.stderr
    again = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert again["epoch"] == 2 and again["optimizer"]["param_groups"][0]["fused"] is True


def test_sigkill_while_a_checkpoint_is_being_written_resumes_from_a_valid_one(mnist_root, tmp_path):
    """The reference model's checkpoints (40 MB) are written while training goes on; a
    SIGKILL in the middle of such a write leaves the previous last.pt whole, and the run
    resumes from it to the end."""
    folder = tmp_path / "run"
    args = [
        f"data.root={mnist_root}",
        "data.train_split=test",
        "data.limit=128",
        "trainer.epochs=40",
        "trainer.progress=false",
        "logger=none",
        "eval.enabled=false",
        f"hydra.run.dir={folder}",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "vae_exp", *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints, caught = folder / "checkpoints", None
    try:
        deadline = time.monotonic() + 240
        while caught is None and process.poll() is None and time.monotonic() < deadline:
            if (checkpoints / "last.pt").is_file():  # a write after the first one
                caught = next((p.name for p in checkpoints.glob(".last.pt.*.tmp")), None)
            time.sleep(0.001)
        assert caught, "no checkpoint write was caught in progress"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    kept = load_checkpoint(checkpoints / "last.pt")  # whole, checksum verified
    assert 1 <= kept["epoch"] < 40
    resumed = run_cli(
        [*args, "trainer.resume=auto", "trainer.epochs=" + str(kept["epoch"] + 2)], cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resuming {checkpoints / 'last.pt'}: epoch {kept['epoch']} done"
        in resumed.stdout + resumed.stderr
    )
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == kept["epoch"] + 2
    assert not list(checkpoints.glob(".*.tmp"))  # the killed writer's file was cleared
    assert [m["epoch"] for m in metrics(folder)] == list(range(1, kept["epoch"] + 3))
