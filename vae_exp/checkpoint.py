"""Saving and loading checkpoints: atomic writes, plain contents (loadable with weights_only)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from vae_exp.config import ConfigError, one_line

FORMAT_VERSION = 1

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
    broken one. A checksum of the contents is stored with them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; checkpoints are shared like any file
    try:
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, verifying its format version and
    checksum; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
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
    found = [p for root in search if root.is_dir() for p in root.rglob("checkpoints/last.pt")]
    found = sorted(
        {p for p in found if p.is_file() and p != own},
        key=lambda p: p.stat().st_mtime if p.exists() else 0,
        reverse=True,
    )
    for path in [own] * own.is_file() + found:
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            log.warning("trainer.resume=auto: skipping %s: %s", path, e)
            continue
        if not config_differences(state["config"], config):  # the newest run of this config
            return path if state["epoch"] < epochs else None  # finished: start anew
    return None


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
