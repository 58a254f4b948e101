"""Run folders and checkpoints: one run per folder (a lock), write errors that name the file,
atomic checkpoint writes, plain contents (loadable with weights_only), resuming."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import pickle
import re
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vae_exp.config import ConfigError, one_line
from vae_exp.distributed import global_rank, launched_by_torchrun

FORMAT_VERSION = 1

log = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A checkpoint that is missing, unreadable, corrupt, or of another format or experiment."""


# --------------------------------------------------------------------------------------------
# Run folders


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
    folder (the others run in ".", which is not claimed)."""

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


def refuse(error: ConfigError) -> None:
    """Stop before Hydra starts the job (its logging is not set up yet): the message on
    stderr, exit code 2."""
    print(f"vae_exp: {error}", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------------------------
# Checkpoints


def checksum(state: Any) -> str:
    """SHA-256 over every value of `state` (tensors by their bytes), in a fixed order: a
    checkpoint whose bytes changed after writing no longer matches its stored checksum."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(value.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(f"K{key!r}".encode())
                feed(value[key])
        elif isinstance(value, list | tuple):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"V{value!r}".encode())

    feed(state)
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (tensors, numbers, strings, lists and dicts only) to `path` atomically:
    a temporary file in the same folder is written, flushed to disk, then renamed over `path`
    (and the folder flushed), so a crash mid-write never replaces a good checkpoint with a
    broken one. A checksum of the contents is stored with them. A write that fails (disk
    full, read-only folder, ...) leaves `path` as it was and raises an OutputError naming it."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; checkpoints are shared like any file
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, "checksum": checksum(state), **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if not (isinstance(e, OSError | RuntimeError) and caused_by_os_error(e)):
            raise
        raise write_failure("checkpoint", path, e, checkpoint_kept(path)) from None


def checkpoint_kept(path: Path) -> str:
    """After a failed write of checkpoint `path`: what is still there and how to go on."""
    kept = (
        f"{path} was not replaced: it still holds the previous checkpoint."
        if path.is_file()
        else "Nothing was written there."
    )
    return f"{kept} {how_to_go_on(path.parent.parent)}"


def how_to_go_on(run_dir: Path) -> str:
    """After a failed write in `run_dir`: how to continue once the disk has room."""
    last = run_dir / "checkpoints" / "last.pt"
    then = f"continue with trainer.resume={last}" if last.is_file() else "start the run again"
    return f"Training stopped. Make room (or make the folder writable), then {then}."


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, verifying its format version and
    checksum; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        refused = refused_content(e)
        if refused is not None:  # never loaded without weights_only: that would run its code
            raise CheckpointError(
                f"checkpoint {path} holds something other than tensors, numbers, strings, "
                f"lists and dicts ({refused}): it is not a checkpoint vae_exp wrote, or it is "
                "corrupt. vae_exp reads only the plain checkpoints it writes."
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt?): {one_line(e)}"
        ) from e
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {version!r}; this vae_exp reads {FORMAT_VERSION}"
        )
    stored = state.pop("checksum", None)
    state.pop("format_version")
    if stored != checksum(state):
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum does not match")
    return state


def refused_content(error: BaseException) -> str | None:
    """What torch's weights-only loader refused ("Unsupported global: GLOBAL x.Foo was not an
    allowed global by default"), without its advice to load with weights_only=False (which
    would run code from the file) or to allowlist the class; None for other errors."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    text = " ".join(str(error).split())
    match = re.search(r"WeightsUnpickler error: (.*?)(?: Please (?:use|file)| Check the |$)", text)
    return match.group(1).strip() or "refused by the weights-only loader" if match else None


# --------------------------------------------------------------------------------------------
# Resuming

# Keys that may change when a run is resumed: how long and where it runs, and how it is logged.
RESUMABLE_CHANGES = (
    "trainer.epochs",
    "trainer.resume",
    "trainer.device",
    "trainer.progress",
    "trainer.log_every",
    "trainer.skip_nonfinite",
    "trainer.precision",
    "trainer.channels_last",
    "trainer.cuda_graph",
    "trainer.compile",
    "optim.optimizer.fused",
    "data.root",
    "data.num_workers",
    "logger.",
    "eval.",
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


# Keys added after checkpoints already existed, with the value that means "as before": a
# checkpoint without the key resumes when the key still has that value.
ADDED_KEYS = {
    "data.binarize": "none",
    "loss.kl_schedule.kind": "constant",
    "loss.free_bits": 0.0,
    "loss.capacity": None,
    "loss.bound": "iwae",
    "model.hidden_dims": None,
}


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys (other than RESUMABLE_CHANGES) whose values differ, as 'key: saved -> current'."""
    a, b = flatten(saved), flatten(current)
    for key, value in ADDED_KEYS.items():
        if key not in a and key in b and b[key] == value:
            a[key] = value
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if not k.startswith(RESUMABLE_CHANGES) and a.get(k, a) != b.get(k, a)
    ]


def find_resume_checkpoint(
    resume: str, config: dict, run_dir: Path, search: list[Path], epochs: int
) -> Path | None:
    """The checkpoint `trainer.resume` names: a checkpoint file, a run directory (its
    checkpoints/last.pt), or `auto`: this run directory's own last.pt if it has one (a
    requeued job), else the newest checkpoints/last.pt under the `search` folders whose config
    matches `config`, if that run is unfinished (None otherwise: the run starts anew; older
    runs of the config are never forked)."""
    if resume != "auto":
        path = Path(resume).expanduser()
        if path.is_dir():
            path = path / "checkpoints" / "last.pt"
        if not path.is_file():
            raise CheckpointError(
                f"Invalid config: trainer.resume={resume!r}: no checkpoint at {path}; allowed: "
                "a checkpoint file, a run directory with checkpoints/last.pt, auto, or null."
            )
        return path
    own = run_dir / "checkpoints" / "last.pt"
    if own.is_file():
        state = load_own_checkpoint(own)
        if not config_differences(state["config"], config):
            return own if state["epoch"] < epochs else None  # finished: start anew
    found = [p for root in search if root.is_dir() for p in root.rglob("checkpoints/last.pt")]
    found = sorted(
        {p for p in found if p.is_file() and p != own},
        key=lambda p: p.stat().st_mtime if p.exists() else 0,
        reverse=True,
    )
    for path in found:
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:  # another run's: not this run's progress
            log.warning("trainer.resume=auto: skipping %s: %s", path, e)
            continue
        if not config_differences(state["config"], config):  # the newest run of this config
            return path if state["epoch"] < epochs else None  # finished: start anew
    return None


def load_own_checkpoint(own: Path) -> dict[str, Any]:
    """trainer.resume=auto's own checkpoint (this run folder's last.pt): a damaged one stops
    the run (starting anew would overwrite it and the run's best.pt), saying how to go on."""
    try:
        return load_checkpoint(own)
    except CheckpointError as e:
        best = own.parent / "best.pt"
        try:
            load_checkpoint(best)
            from_best = f"continue from its intact best.pt with trainer.resume={best}, or "
        except CheckpointError:
            from_best = ""
        raise CheckpointError(
            f"trainer.resume=auto: this run folder's own checkpoint is damaged ({e}). Nothing "
            f"was changed. To go on, {from_best}move {own.parent} out of the way to start this "
            "run anew."
        ) from None


def rng_state(data_generator: torch.Generator) -> dict[str, Any]:
    """Every random state training draws from: torch's CPU and CUDA generators and the data
    order's generator."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": data_generator.get_state(),
    }


def restore_rng(state: dict[str, Any], data_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if (
        state["cuda"]
        and torch.cuda.is_available()
        and len(state["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state["cuda"])
    data_generator.set_state(state["data"])
