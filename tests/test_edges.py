"""Edges of runs that survive: two runs and one folder, epochs without a finite step, damaged
or refused checkpoints, and disks that are full or read-only."""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, cli_env, run_cli
from tests.test_resilience import metrics
from vae_exp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vae_exp.outputs import RunDirInUse, claim_run_dir, release_run_dir

QUICK = [*TINY, "logger=none", "eval.enabled=false"]


def start(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    """`python -m vae_exp ARGS` in the background (output captured as text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "vae_exp", *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def assert_one_paragraph(output: str) -> None:
    assert "Traceback" not in output and "Error executing job" not in output, output[-3000:]


# --------------------------------------------------------------------------------------------
# Two runs, one folder


def test_two_runs_started_together_get_a_folder_each(mnist_root, tmp_path):
    runs = [start(QUICK, tmp_path) for _ in range(2)]
    for run in runs:
        output = run.communicate(timeout=300)[0]
        assert run.returncode == 0, output[-3000:]
    folders = sorted(tmp_path.glob("outputs/*/*"))
    assert len(folders) == 2, folders
    for folder in folders:
        assert [m["epoch"] for m in metrics(folder)] == [1, 2]
        assert load_checkpoint(folder / "checkpoints" / "last.pt")["epoch"] == 2


def test_a_run_folder_in_use_is_refused(mnist_root, tmp_path):
    folder = tmp_path / "run"
    first = start([*QUICK, "trainer.epochs=3", f"hydra.run.dir={folder}"], tmp_path)
    deadline = time.time() + 120
    while not (folder / ".lock").is_file() or not (folder / ".lock").read_text():
        assert time.time() < deadline and first.poll() is None, first.communicate()[0][-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # paused, holding its folder, while the second one tries
    try:
        second = run_cli([*QUICK, "trainer.seed=7", f"hydra.run.dir={folder}"], cwd=tmp_path)
    finally:
        first.send_signal(signal.SIGCONT)
    output = second.stdout + second.stderr
    assert second.returncode == 2, output[-3000:]
    assert f"The run folder {folder} is in use by another run (pid {first.pid}" in output
    assert_one_paragraph(output)
    assert first.wait(timeout=300) == 0, first.communicate()[0][-3000:]
    # the first run went on undisturbed: its config, log, metrics and checkpoints are its own
    assert "trainer.seed=7" not in (folder / ".hydra" / "overrides.yaml").read_text()
    assert "[ERROR]" not in (folder / "vae_exp.log").read_text()
    assert [m["epoch"] for m in metrics(folder)] == [1, 2, 3]
    assert load_checkpoint(folder / "checkpoints" / "last.pt")["epoch"] == 3
    # once it has ended, the folder is free again (a requeued job resumes in it)
    again = run_cli(
        [*QUICK, "trainer.epochs=4", "trainer.resume=auto", f"hydra.run.dir={folder}"],
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert [m["epoch"] for m in metrics(folder)] == [1, 2, 3, 4]


def test_claiming_a_folder_clears_temporary_files_of_a_killed_writer(tmp_path):
    stale = tmp_path / "checkpoints" / ".last.pt.abc123.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half a checkpoint")
    claim_run_dir(tmp_path)
    try:
        assert not stale.exists()
        save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"epoch": 1})
        assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.pt"]
    finally:
        release_run_dir(tmp_path)
    with open(tmp_path / ".lock") as lock:  # held by another process (its own descriptor)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirInUse, match="is in use by another run"):
            claim_run_dir(tmp_path)
    claim_run_dir(tmp_path)  # free again once the holder is gone
    release_run_dir(tmp_path)


# --------------------------------------------------------------------------------------------
# Epochs without a finite step


SCHEDULE = ["optim/scheduler=step", "optim.scheduler.step_size=1", "trainer.skip_nonfinite=1000"]


def test_an_epoch_whose_validation_loss_is_not_finite_stops_the_run(mnist_root, tmp_path):
    folder = tmp_path / "run"
    args = [*QUICK, *SCHEDULE, "trainer.epochs=3", "optim.scheduler.gamma=1e8"]
    result = run_cli([*args, f"hydra.run.dir={folder}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    assert "Epoch 2 ended with a non-finite validation loss (loss=nan" in output
    assert f"The last good checkpoint is kept: {folder / 'checkpoints' / 'last.pt'}" in output
    assert "Lower optim.optimizer.lr" in output
    assert_one_paragraph(output)
    assert [m["epoch"] for m in metrics(folder)] == [1]  # nothing logged for epoch 2
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(folder / "checkpoints" / name)
        assert state["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_an_epoch_without_a_single_step_stops_the_run(mnist_root, tmp_path):
    folder = tmp_path / "run"
    first = run_cli([*QUICK, "trainer.epochs=1", f"hydra.run.dir={folder}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # weights so large that every step of the next epoch overflows (and is skipped): the
    # first linear layer (to the posterior mean; no BatchNorm after it to scale it back)
    last = folder / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    weight = next(k for k, v in state["model"].items() if v.dim() == 2)
    state["model"][weight] *= 1e30
    save_checkpoint(last, state)
    before = last.read_bytes()
    result = run_cli(
        [*QUICK, "trainer.skip_nonfinite=1000", "trainer.resume=auto", f"hydra.run.dir={folder}"],
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    assert "Epoch 2 took no training step: all 4 of its steps had a non-finite loss" in output
    assert "KeyError" not in output
    assert_one_paragraph(output)
    assert [m["epoch"] for m in metrics(folder)] == [1]
    assert last.read_bytes() == before  # epoch 2 was not saved


# --------------------------------------------------------------------------------------------
# Damaged and refused checkpoints


def test_resume_auto_stops_at_a_damaged_checkpoint_of_its_own_folder(mnist_root, tmp_path):
    folder = tmp_path / "run"
    first = run_cli([*QUICK, "trainer.epochs=1", f"hydra.run.dir={folder}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last, best = folder / "checkpoints" / "last.pt", folder / "checkpoints" / "best.pt"
    last.write_bytes(last.read_bytes()[:1000])
    damaged, intact = last.read_bytes(), best.read_bytes()
    result = run_cli([*QUICK, "trainer.resume=auto", f"hydra.run.dir={folder}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"this run folder's own checkpoint is damaged (checkpoint {last} is unreadable" in output
    assert f"continue from its intact best.pt with trainer.resume={best}" in output
    assert_one_paragraph(output)
    assert last.read_bytes() == damaged and best.read_bytes() == intact  # nothing overwritten
    # the advice works
    resumed = run_cli([*QUICK, f"trainer.resume={best}", f"hydra.run.dir={folder}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(last)["epoch"] == 2


class Payload:
    """Not a tensor, number, string, list or dict: torch's weights-only loader refuses it."""


def test_a_checkpoint_with_other_objects_is_refused_without_weights_only_advice(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"format_version": 1, "model": Payload()}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path} holds something other than tensors")
    assert f"Unsupported global: GLOBAL {__name__}.Payload" in message
    assert "weights_only" not in message.replace("weights_only=True", "")  # no advice to retry
    assert "add_safe_globals" not in message and "\n" not in message


# --------------------------------------------------------------------------------------------
# Disks that are full or read-only


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, mnist_root) -> Path:
    """A finished 1-epoch run, copied by the tests that continue it."""
    folder = tmp_path_factory.mktemp("one_epoch") / "run"
    result = run_cli([*QUICK, "trainer.epochs=1", f"hydra.run.dir={folder}"], cwd=folder.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def copy_run(run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    return folder


def file_size_limit(size: int):
    """For preexec_fn: files of the child may not grow beyond `size` bytes (writes beyond fail
    with EFBIG, as on a full disk, instead of a SIGXFSZ killing the process)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))

    return limit


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(one_epoch, tmp_path):
    folder = copy_run(one_epoch, tmp_path)
    last = folder / "checkpoints" / "last.pt"
    assert last.stat().st_size > 200_000  # larger than the limit; every other file is smaller
    result = subprocess.run(
        [sys.executable, "-m", "vae_exp", *QUICK, "trainer.resume=auto", f"hydra.run.dir={folder}"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=file_size_limit(200_000),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"Could not write checkpoint {last}: the file would exceed" in output
    assert "(EFBIG)" in output and f"continue with trainer.resume={last}" in output
    assert_one_paragraph(output)
    assert load_checkpoint(last)["epoch"] == 1  # the last good checkpoint, intact
    assert not list(folder.glob("checkpoints/.*.tmp"))


@contextlib.contextmanager
def read_only(path: Path):
    """Make `path` unwritable, even for root (chattr +i, immutable); undone afterwards."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: cannot make a folder read-only")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i failed here ({made.stderr.strip()}): no read-only folder as root")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("existing", [True, False])
def test_a_read_only_run_folder_is_refused_before_hydra_writes(existing, tmp_path):
    parent = tmp_path / "outputs"
    parent.mkdir()
    folder = parent / "run"
    if existing:
        folder.mkdir()
    with read_only(folder if existing else parent):
        result = run_cli([*QUICK, f"hydra.run.dir={folder}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"Could not write the run folder {folder}: " in output
    assert "Unable to configure handler" not in output
    assert_one_paragraph(output)


@pytest.mark.parametrize(
    ("frozen", "what"),
    [("checkpoints", "checkpoint"), ("metrics.jsonl", "metrics"), ("samples", "image")],
)
def test_an_unwritable_file_of_the_run_stops_it_naming_the_file(one_epoch, tmp_path, frozen, what):
    folder = copy_run(one_epoch, tmp_path)
    last = folder / "checkpoints" / "last.pt"
    with read_only(folder / frozen):
        result = run_cli([*QUICK, "trainer.resume=auto", f"hydra.run.dir={folder}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"Could not write {what} {folder / frozen}" in output
    assert f"continue with trainer.resume={last}" in output
    assert_one_paragraph(output)
    assert load_checkpoint(last)["epoch"] == 1
