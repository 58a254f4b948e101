"""Saving and loading checkpoints: atomic writes, plain contents (loadable with weights_only)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (tensors, numbers, strings, lists and dicts only) to `path` atomically:
    a temporary file in the same folder is written, flushed to disk, then renamed over `path`,
    so a crash mid-write never replaces a good checkpoint with a broken one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt?): {e}") from e
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format_version {version!r}; this vae_exp reads {FORMAT_VERSION}"
        )
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
    "data.root",
    "data.num_workers",
    "logger.",
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys (other than RESUMABLE_CHANGES) whose values differ, as 'key: saved -> current'."""
    a, b = flatten(saved), flatten(current)
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if not k.startswith(RESUMABLE_CHANGES) and a.get(k, a) != b.get(k, a)
    ]


def find_resume_checkpoint(resume: str, config: dict, search: list[Path]) -> Path | None:
    """The checkpoint `trainer.resume` names: a checkpoint file, a run directory (its
    checkpoints/last.pt), or `auto`: the newest checkpoints/last.pt under the `search` folders
    whose config matches `config` (None when there is none: the run starts fresh)."""
    if resume != "auto":
        path = Path(resume).expanduser()
        if path.is_dir():
            path = path / "checkpoints" / "last.pt"
        if not path.is_file():
            from vae_exp.config import ConfigError

            raise ConfigError(
                f"Invalid config: trainer.resume={resume!r}: no checkpoint at {path}; allowed: "
                "a checkpoint file, a run directory with checkpoints/last.pt, auto, or null."
            )
        return path
    candidates = sorted(
        (p for root in search if root.is_dir() for p in root.rglob("checkpoints/last.pt")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in candidates:
        try:
            saved = load_checkpoint(path)["config"]
        except (ValueError, OSError, KeyError):
            continue  # unreadable or foreign: not a candidate
        if not config_differences(saved, config):
            return path
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
