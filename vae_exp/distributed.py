"""Multi-process training with DistributedDataParallel, started by torchrun.

`torchrun --nproc_per_node=N -m vae_exp ...` starts N processes that each train on 1/N of
every epoch's shuffled order (same order in every process, like DistributedSampler with
`set_epoch`), average gradients (DDP), and all-reduce their metrics. Only rank 0 writes files
and logs to W&B. Without torchrun this module does nothing: `Cluster()` is one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vae_exp.config import ConfigError


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


@dataclass
class Cluster:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, checkpoints and W&B logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce `tensor` in place (sum over processes); returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True in every process if `flag` is true in any (a collective: all must call it)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def share_buffers(self, model: torch.nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm statistics), so that validation in
        every process uses the model rank 0 checkpoints."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def broadcast(self, value):
        """Rank 0's `value`, in every process (any picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """The device trainer.device names for a single process: `auto` is CUDA when available,
    else CPU; an unavailable device is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(name.partition(":")[2] or 0) >= count:
            allowed = " | ".join(["auto", "cpu", *(f"cuda:{i}" for i in range(count))])
            raise ConfigError(
                f"Invalid config: trainer.device={name!r} but this machine has {count} CUDA "
                f"device(s){' (CUDA is not available here)' if count == 0 else ''}; "
                f"allowed: {allowed}."
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "Invalid config: trainer.device='mps' is not available here; allowed: auto | cpu."
        )
    return torch.device(name)


@contextmanager
def start_cluster(device_setting: str) -> Iterator[tuple[Cluster, torch.device]]:
    """This process's place among the training processes and the device it trains on: the
    one place the device is chosen. Alone: one process on `resolve_device(device_setting)`.
    Started by torchrun: join the job, NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK),
    gloo on CPU; the process group is closed when the block ends."""
    if not launched_by_torchrun():
        yield Cluster(), resolve_device(device_setting)
        return
    wants_cuda = device_setting in ("auto", "cuda") and torch.cuda.is_available()
    if device_setting.startswith("cuda:") or device_setting == "mps":
        raise ConfigError(
            f"Invalid config: trainer.device={device_setting!r} with torchrun; allowed: auto | "
            "cuda | cpu (each process takes cuda:LOCAL_RANK itself)."
        )
    if device_setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "Invalid config: trainer.device='cuda' but CUDA is not available here; allowed: "
            "auto | cpu."
        )
    if wants_cuda:
        if local_rank() >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE')} processes per node but "
                f"this node has {torch.cuda.device_count()} GPU(s); use --nproc_per_node <= "
                f"{torch.cuda.device_count()}."
            )
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    cluster = Cluster(rank=dist.get_rank(), world_size=dist.get_world_size())
    try:
        yield cluster, device
    finally:
        cluster.close()
