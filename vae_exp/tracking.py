"""The run directory's files (metrics.jsonl, PNG grids) and Weights & Biases: the only module
that knows about wandb, which is imported only when `logger=wandb`."""

from __future__ import annotations

import json
import logging
import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from vae_exp.config import LoggerConfig, one_line
from vae_exp.outputs import how_to_go_on, write_failure

log = logging.getLogger(__name__)

# What W&B plots against the epoch rather than the optimizer step.
EPOCH_METRICS = (
    "train_epoch/*",
    "val/*",
    "lr",
    "skipped_steps",
    "seconds",
    "gpu_peak_mib",
    "samples",
    "reconstructions",
)


def image_grid(images: Tensor, nrow: int, value_range: tuple[float, float]) -> np.ndarray:
    """A uint8 HxWxC grid of images whose values lie in value_range (clamped, not min-max
    stretched, so grids of different epochs are comparable)."""
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
    array = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return array[:, :, 0] if images.shape[1] == 1 else array  # make_grid makes grey RGB


def wandb_credentials_found() -> bool:
    """True when WANDB_API_KEY is set or the netrc file (`wandb login`) has a key for the W&B
    server (WANDB_BASE_URL, else wandb's default server)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:  # wandb's own lookup knows its default host and the hosts behind it
        from wandb.sdk.lib import urls
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        base_url = os.environ.get("WANDB_BASE_URL", urls.DEFAULT_BASE_URL)
        return read_netrc_auth(host=base_url) is not None
    except ImportError:  # other wandb versions: look the host up ourselves
        pass
    except Exception:  # a malformed netrc or URL: no usable credentials
        return False
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_mode(configured: str) -> str | None:
    """The mode to pass to wandb.init: None when WANDB_MODE is set (it wins; set but empty
    counts as unset), else the configured one, with auto = online if credentials exist,
    otherwise offline."""
    if os.environ.get("WANDB_MODE"):
        return None
    if configured != "auto":
        return configured
    return "online" if wandb_credentials_found() else "offline"


@dataclass
class RunLabels:
    """How a run is found among others in W&B: `name` (the swept values of a sweep job, e.g.
    "latent_dim=64,w=0.001"), `group` (the sweep), `tags` (the swept overrides)."""

    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


class Tracker:
    """Writes metrics and image grids of one run to its directory and, optionally, to W&B.

    W&B never stops training: if it cannot start online (unreachable, key rejected) the run
    logs offline; if a later W&B call fails, W&B logging stops with one warning and the run
    directory's files go on."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        logger: LoggerConfig,
        history: list[dict[str, Any]] | None = None,
        wandb_id: str | None = None,
        labels: RunLabels | None = None,
        write: bool = True,
    ) -> None:
        """`history`: metrics of earlier epochs (a resumed run), written first;
        `wandb_id`: the W&B run to continue; `labels`: name, group and tags in W&B;
        `write`: false in the other processes of a distributed run (rank 0 writes)."""
        self.run_dir = run_dir
        self.write = write
        self.metrics_path = run_dir / "metrics.jsonl"
        if write:
            try:
                self.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in history or []))
            except OSError as e:
                raise self._write_failure("metrics", self.metrics_path, e) from None
        self.logger = logger
        self.labels = labels or RunLabels()
        self.wandb_run = None
        if logger.name == "wandb" and write:
            self.wandb_run = self._start_wandb(config, wandb_id)

    def _start_wandb(self, config: dict[str, Any], wandb_id: str | None):
        # WANDB_MODE= (set but empty) means unset here; wandb would reject "" as a mode.
        if os.environ.get("WANDB_MODE") == "":
            del os.environ["WANDB_MODE"]
        import wandb

        self.wandb = wandb
        lg = self.logger
        mode = wandb_mode(lg.mode)
        init = dict(
            project=lg.project,
            entity=lg.entity,
            name=self.labels.name,
            group=lg.group or self.labels.group,
            tags=[*lg.tags, *self.labels.tags],
            job_type="train",
            config=config,
            dir=str(self.run_dir),
            id=wandb_id,
            resume="allow" if wandb_id else None,
            reinit="finish_previous",  # never silently reuse an earlier run
            settings=wandb.Settings(console="off", init_timeout=lg.init_timeout),
        )
        effective = mode or os.environ.get("WANDB_MODE")
        attempts = [mode] if effective == "offline" else [mode, "offline"]
        for n, attempt in enumerate(attempts, start=1):
            try:
                # No "viewer" query (the account name for wandb's "logged in as" line): wandb
                # makes it twice per init, outside init_timeout, each waiting up to 5 s for an
                # unreachable server; without it, falling back costs init_timeout + about 1 s.
                wandb.setup(settings=wandb.Settings(x_disable_viewer=True))
                run = wandb.init(mode=attempt, **init)
                # x-axes: training terms against the optimizer step, epoch values against the
                # epoch (W&B's own _step counts log calls, so a resumed run never goes back).
                run.define_metric("step")
                run.define_metric("epoch")
                run.define_metric("train/*", step_metric="step")
                for key in EPOCH_METRICS:
                    run.define_metric(key, step_metric="epoch")
                break
            except Exception as e:
                then = "logging offline instead" if n < len(attempts) else "run directory only"
                log.warning(
                    "W&B could not start %s (%s); %s", attempt or effective, one_line(e), then
                )
        else:
            return None
        if (attempt or os.environ.get("WANDB_MODE")) in ("offline", "dryrun"):
            log.info(
                "W&B is offline; upload this run later with: wandb sync %s",
                Path(run.dir).parent,
            )
        return run

    def _write_failure(self, what: str, path: Path, error: OSError) -> Exception:
        """A run file that could not be written: one paragraph naming it (OutputError)."""
        return write_failure(what, path, error, how_to_go_on(self.run_dir))

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def _wandb(self, call: str, *args: Any, **kwargs: Any) -> None:
        """Call a method of the W&B run; on failure warn once and stop using W&B."""
        if self.wandb_run is None:
            return
        try:
            getattr(self.wandb_run, call)(*args, **kwargs)
        except Exception as e:
            log.warning("W&B %s failed (%s); W&B logging stops for this run", call, one_line(e))
            self.wandb_run = None

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Training metrics at optimizer step `step`: the mean over the steps since the last
        call (every trainer.log_every steps). W&B only; the run directory keeps epochs."""
        self._wandb("log", {**metrics, "step": step})

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        """One line of metrics.jsonl, and the same values in W&B, where the epoch means of
        the training terms are named train_epoch/* (W&B's train/* is the per-step series,
        and a value logged at the same step would overwrite it)."""
        if not self.write:
            return
        try:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        except OSError as e:
            raise self._write_failure("metrics", self.metrics_path, e) from None
        renamed = {k.replace("train/", "train_epoch/", 1): v for k, v in metrics.items()}
        self._wandb("log", renamed)

    def log_image(self, epoch: int, name: str, grid: np.ndarray) -> Path:
        """Save `grid` as <run_dir>/<name>/epoch_NNN.png and log it to W&B as `name`."""
        path = self.run_dir / name / f"epoch_{epoch:03d}.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(path)
        except OSError as e:
            raise self._write_failure("image", path, e) from None
        if self.wandb_run is not None and self.logger.log_images:
            try:
                image = self.wandb.Image(grid, caption=f"epoch {epoch}")
            except Exception as e:
                log.warning("W&B image failed (%s); W&B logging stops", one_line(e))
                self.wandb_run = None
                return path
            self._wandb("log", {name: image, "epoch": epoch})
        return path

    def summarize(self, values: dict[str, Any]) -> None:
        """Set values of the W&B run summary (beside the last logged value of every metric)."""
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary.update(values)
            except Exception as e:
                log.warning("W&B summary failed (%s); W&B logging stops", one_line(e))
                self.wandb_run = None

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Close the W&B run: failed when exit_code is non-zero, preempted if so."""
        if preempted:
            self._wandb("mark_preempting")
        self._wandb("finish", exit_code=exit_code)
        self.wandb_run = None
