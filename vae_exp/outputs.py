"""The run folder: one run per folder (a lock, claimed before Hydra writes into it), and the
one-paragraph error for a file of the run that cannot be written (disk full, read-only or
immutable folder, ...)."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shlex
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vae_exp.config import ConfigError, one_line
from vae_exp.distributed import global_rank, launched_by_torchrun

log = logging.getLogger(__name__)


class OutputError(ConfigError):
    """A file of the run could not be written (disk full, read-only or immutable folder, ...)."""

    exit_code = 2


class RunDirInUse(ConfigError):
    """Another live run holds the lock of this run folder."""


# Why a write failed, in words, by errno (others: the system's own words).
WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file would exceed the largest file size allowed (ulimit -f, or the file "
    "system's limit)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied (the folder is not writable for this user)",
    errno.EPERM: "operation not permitted (an immutable or protected file or folder)",
}


def write_reason(error: BaseException) -> str:
    """Why a write failed: the OSError in `error` or behind it (torch.save wraps it in a
    RuntimeError), as words and the errno's name; otherwise the error itself."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno:
            words = WRITE_FAILURES.get(e.errno, e.strerror or os.strerror(e.errno))
            return f"{words} ({errno.errorcode.get(e.errno, e.errno)})"
    return one_line(error)


def caused_by_os_error(error: BaseException) -> bool:
    return any(isinstance(e, OSError) for e in (error, error.__cause__, error.__context__))


def write_failure(what: str, path: Path, error: BaseException, then: str) -> OutputError:
    """The one-paragraph error for `what` (e.g. "checkpoint") at `path` that could not be
    written: the path, why, and `then` (what is kept, what to do)."""
    return OutputError(f"Could not write {what} {path}: {write_reason(error)}. {then}")


# Run folders this process holds (claim_run_dir): folder -> the open descriptor of its lock.
_held: dict[Path, int] = {}


def claim_run_dir(run_dir: Path) -> None:
    """Make `run_dir` this process's own while it lives: an exclusive lock on `run_dir/.lock`
    (released by the system when the process ends, however it ends), so a second run given
    the same folder is refused (RunDirInUse) instead of mixing its metrics and checkpoints
    with this one's. Temporary checkpoint files left by a killed writer are removed (under the
    lock, no live writer has any). An unwritable folder is an OutputError naming it."""
    run_dir = run_dir.resolve()
    if run_dir in _held:
        return
    lock = run_dir / ".lock"
    unwritable = "Choose a writable folder with hydra.run.dir=<path>, or make this one writable."
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_failure("the run folder", run_dir, e, unwritable) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        raise RunDirInUse(
            f"The run folder {run_dir} is in use by another run ({holder}): two runs in one "
            "folder would mix their metrics and overwrite each other's checkpoints. Wait for "
            "that run to end, or give this one its own folder (leave hydra.run.dir unset for a "
            "new one, or set hydra.run.dir=<another path>)."
        ) from None
    except OSError as e:  # a file system without locks (some network mounts): go on unlocked
        log.warning("cannot lock the run folder %s (%s); go on without", run_dir, one_line(e))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise write_failure("the run folder", run_dir, e, unwritable) from None
    _held[run_dir] = fd
    for stale in (run_dir / "checkpoints").glob(".*.tmp"):  # left by a killed writer
        stale.unlink(missing_ok=True)


def release_run_dir(run_dir: Path) -> None:
    """Give up this process's claim on `run_dir` (if it has one)."""
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


class ClaimRunDir(Callback):
    """Hydra callback (conf/config.yaml): before Hydra writes anything into a single run's
    folder (.hydra/, the log file), claim it (`claim_run_dir`) and check that the log file can
    be written; before a sweep, check that its folder can be written. A refusal is one
    paragraph and exit code 2, not Hydra's traceback. Under torchrun only rank 0 has a run
    folder (the others run in ".", which is not claimed). When a sweep's jobs have all
    succeeded, one line says where they are and how to compare them (a failed job ends the
    sweep with vae_exp.__main__'s summary instead)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if launched_by_torchrun() and global_rank() != 0:
            return
        run_dir = Path(str(config.hydra.run.dir))
        log_file = run_dir / f"{config.hydra.job.name}.log"
        try:
            claim_run_dir(run_dir)
            try:
                with open(log_file, "a"):
                    pass
            except OSError as e:
                raise write_failure(
                    "the log file",
                    log_file,
                    e,
                    "Make it writable, or choose another folder with hydra.run.dir=<path>.",
                ) from None
        except ConfigError as e:
            refuse(e)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=sweep_dir) as probe:
                probe.write(b"vae_exp")
                probe.flush()
        except OSError as e:
            then = (
                "Choose a writable folder with hydra.sweep.dir=<path>, or make this one writable."
            )
            refuse(write_failure("the sweep folder", sweep_dir, e, then))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()]
        print(
            f"Sweep finished: {len(jobs)} jobs in {sweep_dir}. Compare them with: "
            f"python -m vae_exp.compare {sweep_dir}"
        )


def refuse(error: ConfigError) -> None:
    """Stop before Hydra starts the job (its logging is not set up yet): the message on
    stderr, exit code 2."""
    print(f"vae_exp: {error}", file=sys.stderr)
    sys.exit(2)


def how_to_go_on(run_dir: Path) -> str:
    """After a failed write in `run_dir`: how to continue once the disk has room."""
    last = run_dir / "checkpoints" / "last.pt"
    then = f"continue with trainer.resume={last}" if last.is_file() else "start the run again"
    return f"Training stopped. Make room (or make the folder writable), then {then}."


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in `run_dir`: its own overrides (from
    .hydra/overrides.yaml, where Hydra wrote them) and trainer.resume=<run_dir>."""
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        overrides = []
    kept = [str(o) for o in overrides if not str(o).startswith("trainer.resume=")]
    return shlex.join(["python", "-m", "vae_exp", *kept, f"trainer.resume={run_dir}"])


@contextmanager
def claimed(run_dir: Path, writer: bool = True) -> Iterator[None]:
    """Hold `run_dir` (`claim_run_dir`) while the block runs; `writer`: false in the processes
    of a distributed run that write nothing (rank 0 holds the folder)."""
    if not writer:
        yield
        return
    claim_run_dir(run_dir)
    try:
        yield
    finally:
        release_run_dir(run_dir)
