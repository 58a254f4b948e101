"""Checkpoints: what they hold (`Position`, `checkpoint_state`), atomic writes with a checksum,
plain contents (loadable with weights_only), written off the training thread
(`CheckpointWriter`), and resuming from one (`resume_or_start`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import secrets
import shutil
import tempfile
import threading
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from vae_exp.config import ConfigError, one_line
from vae_exp.outputs import caused_by_os_error, how_to_go_on, write_failure

FORMAT_VERSION = 1


def _current_umask() -> int:
    umask = os.umask(0)  # the only way to read it; done once, at import (one thread)
    os.umask(umask)
    return umask


UMASK = _current_umask()  # checkpoints get the permissions any new file of the user gets

log = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A checkpoint that is missing, unreadable, corrupt, or of another format or experiment."""


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
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; checkpoints are shared like any file
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, "checksum": checksum(state), **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if not (isinstance(e, OSError | RuntimeError) and caused_by_os_error(e)):
            raise
        raise write_failure("checkpoint", path, e, checkpoint_kept(path)) from None


def link_or_copy(source: Path, target: Path) -> None:
    """Make `target` hold what `source` holds, atomically: a hard link to `source`'s file where
    the file system allows (no second write; the next atomic rename of `source` gives
    `source` a new file and leaves `target` on the old one), else a copy; either goes to a
    temporary name first and is renamed over `target`."""
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (another file system, FAT, some network mounts)
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_folder(target.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failure("checkpoint", target, e, checkpoint_kept(target)) from None


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot(state: Any) -> Any:
    """A copy of `state` in CPU memory that training can no longer change: every tensor copied
    (from the GPU with one wait for all of them), containers rebuilt."""
    on_gpu = []

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu":
                return value.detach().clone()
            on_gpu.append(value.device)
            return value.detach().to("cpu", non_blocking=True)
        if isinstance(value, dict):  # an OrderedDict stays one, with its module versions
            copied = type(value)((k, copy(v)) for k, v in value.items())
            if hasattr(value, "_metadata"):
                copied._metadata = deepcopy(value._metadata)
            return copied
        if isinstance(value, list | tuple):
            return type(value)(copy(v) for v in value)
        return value  # numbers, strings, None: immutable

    copied = copy(state)
    for device in set(on_gpu):
        torch.cuda.synchronize(device)  # the non-blocking copies have landed
    return copied


class CheckpointWriter:
    """Writes checkpoints in a background thread, so training goes on while a checkpoint is
    checksummed, written, flushed to disk and renamed (`save_checkpoint`'s guarantees hold).

    `submit` takes a `snapshot` (CPU copies: training may change the weights meanwhile) and
    writes it to `last` and/or `best` (`best` as a hard link to `last` when both are given).
    At most one write is in flight: `submit` first waits for the previous one. `wait()` waits
    for the pending write and raises its error (an OutputError naming the file), if it had
    one; call it before stopping, at the end of training and on the way out of an error."""

    def __init__(self, written: Path | None = None) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # the newest good checkpoint: `written` (a run resumed from it), then each `last`
        # whose write has completed
        self.written = written

    def submit(self, state: dict[str, Any], last: Path | None, best: Path | None) -> None:
        self.wait()
        if last is None and best is None:
            return
        self._thread = threading.Thread(
            target=self._write, args=(state, last, best), name="checkpoint-writer", daemon=True
        )
        self._thread.start()

    def _write(self, state: dict[str, Any], last: Path | None, best: Path | None) -> None:
        try:
            save_checkpoint(last or best, state)
            if last is not None:
                self.written = last
                if best is not None:
                    link_or_copy(last, best)
        except BaseException as e:  # raised in the training thread by wait() or check()
            self._error = e

    def pending(self) -> bool:
        """Whether a write is still in flight."""
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        """Without waiting: raise the error of a write that has failed (training calls this
        at its log points, so a full disk stops the run within a few steps)."""
        if not self.pending():
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def checkpoint_kept(path: Path) -> str:
    """After a failed write of checkpoint `path`: what is still there and how to go on."""
    kept = (
        f"{path} was not replaced: it still holds the previous checkpoint."
        if path.is_file()
        else "Nothing was written there."
    )
    return f"{kept} {how_to_go_on(path.parent.parent)}"


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
    "data.val_batch_size",
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


# --------------------------------------------------------------------------------------------
# What a checkpoint holds, and resuming from one


class Parts(Protocol):
    """The built parts of an experiment that a checkpoint saves and restores
    (vae_exp.build.Experiment has them)."""

    config: dict[str, Any]
    trainer: Any  # TrainerConfig: resume, epochs
    cluster: Any  # Cluster
    model: torch.nn.Module
    loss_fn: Any  # VAELoss: its KL-schedule state
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Any  # Data: the training split's shuffle generator


@dataclass
class Position:
    """Where training stands: with the weights, optimizer and RNG states, all a checkpoint
    needs to continue exactly, even from the middle of an epoch."""

    epoch: int = 0  # epochs completed
    batches_done: int = 0  # batches done in the epoch after that (mid-epoch checkpoints)
    epoch_steps: int = 0  # of those, the steps taken (not skipped) and summed in `sums`
    step: int = 0  # optimizer steps taken (skipped non-finite steps not counted)
    sums: dict[str, float] = field(default_factory=dict)  # per-batch terms summed, this epoch
    skipped: int = 0  # non-finite steps skipped so far (trainer.skip_nonfinite)
    best_val_loss: float = math.inf


def checkpoint_state(
    exp: Parts, pos: Position, metrics: dict | None, wandb_id: str | None
) -> dict[str, Any]:
    """Everything a checkpoint holds (plain tensors and containers: weights_only-loadable)."""
    return {
        "model": exp.model.state_dict(),
        "loss": exp.loss_fn.state_dict(),  # KL schedule / capacity state
        "optimizer": exp.optimizer.state_dict(),
        "scheduler": exp.scheduler.state_dict() if exp.scheduler is not None else None,
        "position": asdict(pos),
        "epoch": pos.epoch,
        "step": pos.step,
        "config": exp.config,
        "metrics": metrics,
        "rng": rng_state(exp.data.train.generator),
        "wandb_id": wandb_id,
    }


@dataclass
class Start:
    """Where a run starts: its Position, the W&B run to continue and the metrics of the epochs
    already done (all empty for a new run)."""

    position: Position = field(default_factory=Position)
    wandb_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None  # the checkpoint resumed from


def resume_or_start(exp: Parts, run_dir: Path) -> Start:
    """Resume from the checkpoint `trainer.resume` names (see `find_resume_checkpoint`),
    loading it into the model, optimizer, scheduler, loss (its KL schedule) and RNGs; or start
    anew. The old run's best.pt is copied into `run_dir`, so the best model so far stays with
    the run (rank 0 only, under torchrun)."""
    trainer, cluster = exp.trainer, exp.cluster
    path = None
    if trainer.resume is not None:
        roots = [Path.cwd() / "outputs", Path.cwd() / "multirun"]
        if cluster.is_main:
            path = find_resume_checkpoint(
                trainer.resume, exp.config, run_dir, roots, trainer.epochs
            )
        path = cluster.broadcast(path)
        if path is None:
            log.info("trainer.resume=auto: no unfinished run of this experiment; starting anew")
    if path is None:
        return Start()
    state = load_checkpoint(path)
    differences = config_differences(state["config"], exp.config)
    if differences:
        raise ConfigError(
            f"Invalid config: trainer.resume: {path} was made for another experiment "
            f"({'; '.join(differences[:5])}). Resume with the same settings, or start a new run."
        )
    if state["epoch"] >= trainer.epochs:
        raise ConfigError(
            f"Invalid config: trainer.resume: {path} has already trained {state['epoch']} "
            f"epochs; allowed: trainer.epochs > {state['epoch']} to train it further."
        )
    exp.model.load_state_dict(state["model"])
    exp.optimizer.load_state_dict(state["optimizer"])
    for group in exp.optimizer.param_groups:  # how to compute the update: today's settings
        for key in ("fused", "foreach"):
            if key in exp.optimizer.defaults:
                group[key] = exp.optimizer.defaults[key]
    if exp.scheduler is not None and state["scheduler"] is not None:
        exp.scheduler.load_state_dict(state["scheduler"])
    exp.loss_fn.load_state_dict(state.get("loss") or {})
    restore_rng(state["rng"], exp.data.train.generator)
    pos = Position(**state["position"])
    old_dir = path.parent.parent
    best = old_dir / "checkpoints" / "best.pt"
    if cluster.is_main and best.is_file() and old_dir.resolve() != run_dir.resolve():
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy2(best, run_dir / "checkpoints" / "best.pt")
    log.info(
        "resuming %s: epoch %d done, %d batches into the next, step %d",
        path,
        pos.epoch,
        pos.batches_done,
        pos.step,
    )
    return Start(pos, state.get("wandb_id"), read_history(old_dir, pos.epoch), path)


def read_history(run_dir: Path, epochs: int) -> list[dict[str, Any]]:
    """The metrics.jsonl lines of a run's first `epochs` epochs (a line cut short by a kill
    is skipped)."""
    history = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [m for m in history if m.get("epoch", math.inf) <= epochs]
